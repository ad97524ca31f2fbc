"""Forward throughput of the pretrained ImageNet-CGN networks (BigGAN-deep, U2-Net).

Random weights: the cost of a forward pass does not depend on the weight values, so
the timing needs no converted checkpoint. Prints one JSON line per configuration.

    python benchmarks/forward_throughput.py --model biggan --batch 8 --dtype float32
    python benchmarks/forward_throughput.py --model u2net --batch 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _random_like(shapes, key):
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])


def build(model_name: str, batch: int, dtype, size: int):
    key = jax.random.PRNGKey(0)
    if model_name == "biggan":
        from cgn_jax.models.biggan import BigGANConfig, BigGANDeep, truncated_noise

        model = BigGANDeep(BigGANConfig.variant(size), dtype=dtype)
        variables = _random_like(model.init_shapes(), key)
        # keep BN variances positive
        variables = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.abs(x) + 1.0 if "var" in jax.tree_util.keystr(p) else x, variables)
        z = truncated_noise(key, batch, model.config.z_dim, 0.5)
        y = jax.nn.one_hot(jnp.arange(batch) % 1000, 1000)
        stats = model.stats(0.5)
        fn = jax.jit(lambda v, z, y: model.apply(v, z, y, stats))
        return fn, (variables, z, y)
    if model_name == "u2net":
        from cgn_jax.models.u2net import U2Net

        model = U2Net(dtype=dtype)
        variables = _random_like(model.init_shapes(), key)
        variables = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.abs(x) + 1.0 if "var" in jax.tree_util.keystr(p) else x, variables)
        x = jax.random.normal(key, (batch, size, size, 3))
        fn = jax.jit(lambda v, x: model.apply(v, x))
        return fn, (variables, x)
    raise SystemExit(f"unknown model {model_name!r}; use biggan or u2net")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("biggan", "u2net"), required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--size", type=int, default=256, help="BigGAN resolution / U2-Net input size")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    for batch in args.batch:
        fn, inputs = build(args.model, batch, dtype, args.size)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        print(json.dumps({"model": args.model, "size": args.size, "batch": batch, "dtype": args.dtype,
                          "device": jax.devices()[0].device_kind, "first_call_s": round(compile_s, 2),
                          "median_s": round(med, 4), "min_s": round(min(times), 4),
                          "images_per_s": round(batch / med, 1)}), flush=True)


if __name__ == "__main__":
    main()
