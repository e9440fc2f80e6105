"""What the PyTorch peers (peer_map_gpu.py, peer_generate_hf.py) set up the same way: the device
and dtype they run on, from their --device and --dtype arguments."""

DTYPES = ("bf16", "f16", "f32", "tf32")


def device_and_dtype(torch, device_arg, dtype_arg):
    """(device, dtype, matmul precision) with gradients off, the CUDA device made current and the
    f32 matmul precision set ("high" = TF32 for --dtype tf32, else "highest"); or (exit code,
    message) when the device cannot be used: 2 for a bad --device, 4 for CUDA without a GPU."""
    torch.set_grad_enabled(False)
    try:
        device = torch.device(device_arg)
    except RuntimeError as e:
        return 2, f"bad --device {device_arg}: {e}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return 4, ("--device cuda but torch.cuda.is_available() is False "
                       f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "tf32": torch.float32}[dtype_arg]
    precision = "high" if dtype_arg == "tf32" else "highest"
    torch.set_float32_matmul_precision(precision)
    return device, dtype, precision
