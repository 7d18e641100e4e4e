"""Device layouts (minicake/platforms/devices.py): one GPU per instance process, in rank order, or
a one-line error naming what was asked, what was found and what to do. The GPUs are pretended
(torch.cuda's counts monkeypatched): this runs on any machine."""
import pytest
import torch

from minicake.platforms.devices import assign_devices, gpu_spec


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): torch sees n CUDA GPUs from now on."""
    def pretend(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return pretend


def test_cpu_puts_every_rank_on_the_cpu(gpus):
    gpus(2)
    assert assign_devices("cpu", 3) == ["cpu", "cpu", "cpu"]


def test_cuda_gives_each_rank_its_own_gpu_in_rank_order(gpus):
    gpus(4)
    assert assign_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:2"]


def test_no_device_means_cuda_where_there_is_a_gpu_and_cpu_where_there_is_none(gpus):
    gpus(2)
    assert assign_devices(None, 2) == ["cuda:0", "cuda:1"]
    gpus(0)
    assert assign_devices(None, 2) == ["cpu", "cpu"]


def test_a_named_gpu_hosts_a_single_colocated_instance(gpus):
    gpus(2)
    assert assign_devices("cuda:1", 1) == ["cuda:1"]


def test_more_ranks_than_gpus_says_how_many_and_what_to_do(gpus):
    gpus(1)  # --prefill 1 --decode 1 on one GPU
    with pytest.raises(ValueError, match=r"^2 instance processes need 2 GPUs .* found 1: use --colocated, "
                                         r"fewer instances .*, or --device cpu$"):
        assign_devices("cuda", 2)
    gpus(2)  # --pipeline-stages 2: two prefill stages and a decode instance on two GPUs
    with pytest.raises(ValueError, match="3 instance processes need 3 GPUs"):
        assign_devices(None, 3)


def test_a_gpu_index_out_of_range_is_named(gpus):
    gpus(2)
    with pytest.raises(ValueError, match=r"'cuda:2': GPU index out of range, torch sees 2 GPU\(s\), cuda:0 to cuda:1"):
        assign_devices("cuda:2", 1)


def test_one_named_gpu_for_several_ranks_is_refused(gpus):
    gpus(2)
    with pytest.raises(ValueError, match="'cuda:1' names one GPU, but 2 instance processes need one GPU each"):
        assign_devices("cuda:1", 2)


def test_cuda_without_a_gpu_and_unknown_devices_are_refused(gpus):
    gpus(0)
    with pytest.raises(ValueError, match="sees no CUDA GPU: use --device cpu"):
        assign_devices("cuda", 1)
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        assign_devices("gpu", 1)
    with pytest.raises(ValueError, match="runs on cpu or cuda, not mps"):
        assign_devices("mps", 1)


def test_gpu_peaks_are_looked_up_by_device_name_longest_name_first():
    assert gpu_spec("NVIDIA H100 80GB HBM3").hbm_bytes_s == 3.35e12
    assert gpu_spec("NVIDIA H100 PCIe").bf16_flops == 756e12
    assert gpu_spec("NVIDIA GH200 480GB").hbm_bytes_s == 4.0e12  # not taken for an H200
    assert gpu_spec("NVIDIA L4").hbm_bytes_s == 0.3e12 and gpu_spec("NVIDIA L40S").bf16_flops == 362e12
    assert gpu_spec("Some Future GPU") is None
