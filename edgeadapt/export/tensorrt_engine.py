"""Optional TensorRT engine, built with the REFIT flag so new parameter versions are refitted by name."""

from __future__ import annotations

from pathlib import Path

from edgeadapt.core import bundle as B


def tensorrt_unavailable_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the `tensorrt` package is not installed (pip install 'edgeadapt[tensorrt]')"
    try:
        import ctypes

        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
            return "no CUDA GPU is available"
    except OSError:
        return "no CUDA driver (libcuda.so.1) is available"
    return None


def build_engine(bundle_dir: str | Path, fp16: bool = True, workspace_mb: int = 1024, max_batch: int = 64) -> Path:
    """Build engine.plan from the static graph (BN nodes kept, so they stay refittable) and record its hash."""
    import tensorrt as trt

    bundle_dir = Path(bundle_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # from the file, not its bytes: the graph's weights are external data in source.safetensors next to it
    if not parser.parse_from_file(str(bundle_dir / B.STATIC_GRAPH)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the static graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.REFIT)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = list(inp.shape)[1:]
    profile.set_shape(inp.name, [1, *shape], [max_batch, *shape], [max_batch, *shape])
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT engine build failed")
    out = bundle_dir / B.ENGINE
    out.write_bytes(bytes(plan))
    manifest = B.read_manifest(bundle_dir)
    manifest.files.update(B.hash_files(bundle_dir, [B.ENGINE]))
    B.write_manifest(bundle_dir, manifest)
    return out
