"""Model helpers shared by steps and plugins: loading, generation, evaluation."""
