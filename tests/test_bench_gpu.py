"""The GPU check script (``benchmarks/bench_gpu.py``) runs, and its checks can fail.

On the CPU it runs both workloads shrunk (``quick``); on CUDA, when there is one, the real
check runs on the shrunk workloads too, with the host-tensor watch on.
"""

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from benchmarks import bench_gpu

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_on_cpu_calibrates_and_recovers_both_workloads():
    found = bench_gpu.run(quick=True, device="cpu")
    assert [r["workload"] for r in found["rows"]] == ["mlp", "gpt2"]
    for row in found["rows"]:
        assert row["sync_calls"] == {}, row["workload"]
        assert row["overhead"] > 0 and row["layers"] >= 4
        # both solves give a working model: half the rank of random layers keeps part of the
        # output, and relu's objective never ends above the linear start it begins from
        assert 0.0 < row["relative_error_linear"] < 1.0
        assert 0.0 < row["relative_error_relu"] < 1.0
    table = bench_gpu.table(found["rows"])
    assert table.startswith("cpu, ") and "| mlp |" in table and "| gpt2 |" in table


def test_without_cuda_the_check_says_so():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        bench_gpu.run(quick=True, device="cuda")


def test_the_counter_sees_a_sync_and_a_host_tensor():
    """The watch is not blind: ``item`` and a boolean mask count as syncs, and with a device
    given, a large result elsewhere counts as host work (``meta`` stands in for a GPU)."""
    x = torch.randn(100)
    with bench_gpu.CallCounter() as counter:
        x.sum().item()
        x[x > 0]
    assert counter.syncs["item"] == 1 and counter.syncs["__getitem__[bool]"] == 1
    with bench_gpu.CallCounter(torch.device("meta")) as counter:
        torch.zeros(bench_gpu.HOST_ELEMENTS)
        torch.zeros(10)
    assert sum(counter.host.values()) == 1


def test_state_left_on_the_host_is_named():
    layer = nn.Sequential(nn.Linear(8, 8))
    low = tl.convert(layer, rank=2)
    low(torch.randn(16, 8))
    found = bench_gpu.off_device(low, torch.device("meta"))
    assert found and all(item.startswith("0: cpu") for item in found)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_run_on_cuda_keeps_everything_on_the_device():
    found = bench_gpu.run(quick=True, device="cuda")
    for row in found["rows"]:
        assert row["sync_calls"] == {} and row["host_tensors_calibrating"] == {}
        assert row["host_tensors_recover_linear"] == {} and row["host_tensors_recover_relu"] == {}
