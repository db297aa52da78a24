"""The agent's calibration on a CUDA host: per-GPU matmul TFLOP/s in the training dtypes and
memory bandwidth, as the cost model reads them (`stratosd.costmodel.capacity.offer_speed`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu.conftest import Record

pytestmark = pytest.mark.gpu


def test_calibration_measures_each_gpu_in_the_training_dtypes(tmp_path: Path,
                                                              record: Record) -> None:
    import torch

    from agents.calibrate import measure
    from schemas.specs import ServerOffer
    from stratosd.costmodel.capacity import offer_speed

    cap = measure(0, tmp_path)
    assert cap.error is None, cap.error
    assert cap.device == "cuda" and cap.devices == torch.cuda.device_count()
    assert cap.matmul_tflops["bf16"] > cap.matmul_tflops["fp32"] > 0
    assert cap.mem_bw_gbps is not None and cap.mem_bw_gbps > 50  # HBM/GDDR, not host RAM
    for dtype, value in cap.matmul_tflops.items():
        record(f"matmul {dtype}", value, "TFLOP/s")
    record("memory bandwidth", cap.mem_bw_gbps, "GB/s")
    name = torch.cuda.get_device_name(0)
    offer = ServerOffer(id="here", gpu_model=name, gpu_count=cap.devices, capacity=cap)
    speed = offer_speed(offer)
    # the cost model trains in bf16 on a GPU and credits what this GPU measured, per device
    assert speed.source == "measured" and speed.tflops == pytest.approx(
        cap.matmul_tflops["bf16"])
    assert speed.devices == cap.devices
