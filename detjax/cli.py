"""The ``detjax`` command line.

``detjax demo``: the reproducibility experiment, plain XLA against detjax side by side.
``detjax bench``: the kernel benchmark table on the current device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PRESETS = ("tiny", "small", "gemma1_2b", "gemma2_2b", "gemma3_1b")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _build_model(args, impl):
    from flax import nnx
    from detjax.models.gemma import GemmaConfig, Transformer
    if args.checkpoint:
        from detjax import checkpoint
        try:
            model = checkpoint.restore(args.checkpoint)
        except (ValueError, OSError) as e:
            raise CliError(f"cannot read checkpoint {args.checkpoint!r}: {e}") from e
        from detjax.nn import set_implementation
        set_implementation(model, impl)
        return model
    if args.model not in PRESETS:
        raise CliError(f"unknown model {args.model!r}; choose one of {', '.join(PRESETS)}")
    config = getattr(GemmaConfig, args.model)()
    if args.upcast:
        config = config.with_upcast(True)
    return Transformer(config, rngs=nnx.Rngs(args.seed), impl=impl)


def _batches(num_samples, needle, vocab, rng):
    """Sample i: the needle inside a batch of a different size, at a different position, next to
    neighbours of other (shorter or equal) lengths."""
    sizes = [1, 3, 2, 4]
    out = []
    for i in range(num_samples):
        size = sizes[i % len(sizes)]
        pos = i % size
        batch = [list(rng.integers(1, vocab, size=int(rng.integers(1, len(needle) + 1))))
                 for _ in range(size)]
        batch[pos] = list(needle)
        out.append((batch, pos))
    return out


def _run_impl(args, impl, batches):
    import numpy as np
    from detjax.generate import generate
    model = _build_model(args, impl)
    tokens, logprobs = [], []
    t0 = time.perf_counter()
    for batch, pos in _progress(batches, f"{impl:6s}", args.json):
        res = generate(model, batch, args.max_new_tokens, temperature=args.temperature,
                       seed=args.seed, max_len=args.max_len)
        tokens.append(np.asarray(res.tokens[pos]))
        logprobs.append(np.asarray(res.logprobs[pos], np.float32))
    elapsed = time.perf_counter() - t0
    ref_t, ref_l = tokens[0], logprobs[0]
    unique = len({t.tobytes() for t in tokens})
    first_div = None
    max_diff = 0.0
    for t, lp in zip(tokens[1:], logprobs[1:]):
        n = min(len(t), len(ref_t))
        d = np.nonzero(t[:n] != ref_t[:n])[0]
        pos = int(d[0]) if len(d) else (n if len(t) != len(ref_t) else None)
        if pos is not None:
            first_div = pos if first_div is None else min(first_div, pos)
        same = n if pos is None else pos
        if same:
            max_diff = max(max_diff, float(np.max(np.abs(lp[:same] - ref_l[:same]))))
        bitwise = lp[:same].view(np.uint32) == ref_l[:same].view(np.uint32)
        if not bitwise.all() and max_diff == 0.0:
            max_diff = float("nan")  # differs only in the sign of zero / NaN payload
    identical = all(np.array_equal(lp.view(np.uint32), ref_l.view(np.uint32)) and
                    np.array_equal(t, ref_t) for t, lp in zip(tokens, logprobs))
    return dict(impl=impl, unique_completions=unique, first_divergence=first_div,
                max_logprob_diff=max_diff, bitwise_identical=identical, seconds=elapsed,
                completion=[int(x) for x in ref_t])


def _progress(items, label, quiet):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and not quiet:
        return tqdm(items, desc=label, file=sys.stderr, leave=False)
    return items


def cmd_demo(args):
    import jax
    import numpy as np
    import detjax
    if args.backend is not None:
        try:
            detjax.chosen_backend(args.backend)
        except ValueError as e:
            raise CliError(str(e)) from None
        import os
        os.environ["DETJAX_BACKEND"] = args.backend
    on_gpu = jax.default_backend() == "gpu"
    args.model = args.model or ("small" if on_gpu else "tiny")
    args.num_samples = args.num_samples or (16 if on_gpu else 4)
    args.max_new_tokens = args.max_new_tokens or (32 if on_gpu else 8)
    rng = np.random.default_rng(args.seed)
    probe = _build_model(args, "detjax")
    vocab = probe.config.vocab_size
    needle = [int(t) for t in rng.integers(1, vocab, size=args.prompt_len)]
    batches = _batches(args.num_samples, needle, vocab, rng)
    results = [_run_impl(args, impl, batches) for impl in ("xla", "detjax")]
    report = dict(device=jax.devices()[0].device_kind, backend=detjax.chosen_backend(),
                  model=args.model, num_samples=args.num_samples,
                  max_new_tokens=args.max_new_tokens, results=results)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"detjax demo: {args.num_samples} completions of one {args.prompt_len}-token prompt by the "
          f"'{args.model}' Gemma-style model (random weights, seed {args.seed}), each generated "
          f"inside a batch of different size and neighbours.\n"
          f"device {report['device']}, detjax backend '{report['backend']}', jax {jax.__version__}\n")
    rows = [("unique completions", "unique_completions", "{}"),
            ("first divergent token", "first_divergence", "{}"),
            ("largest logprob difference", "max_logprob_diff", "{:.3g}"),
            ("bitwise identical", "bitwise_identical", "{}"),
            ("time (s, incl. compile)", "seconds", "{:.1f}")]
    print(f"{'':30s} {'plain XLA':>14s} {'detjax':>14s}")
    for label, key, fmt in rows:
        cells = [("none" if r[key] is None else fmt.format(r[key])) for r in results]
        print(f"{label:30s} {cells[0]:>14s} {cells[1]:>14s}")
    ok = results[1]["bitwise_identical"]
    print("\ndetjax: every completion and every logprob is bitwise identical." if ok else
          "\ndetjax: completions DIFFER — please report this as a bug.")
    return 0 if ok else 1


def cmd_bench(args):
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from benchmarks import bench_kernels
    except ImportError as e:
        raise CliError(f"the benchmark suite is not available in this install ({e}); run it from a "
                       "source checkout") from None
    argv = ["--only", args.only] + (["--quick"] if args.quick else []) + \
        (["--json", args.json_out] if args.json_out else [])
    bench_kernels.main(argv)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="detjax", description="Bitwise-reproducible JAX: demo and tools.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="plain XLA vs detjax: the same prompt in different batches")
    d.add_argument("--model", default=None, help=f"preset: {', '.join(PRESETS)} (default tiny on CPU, small on GPU)")
    d.add_argument("--checkpoint", default=None, help="a detjax.checkpoint directory instead of a preset")
    d.add_argument("--num-samples", type=_positive_int, default=None)
    d.add_argument("--max-new-tokens", type=_positive_int, default=None)
    d.add_argument("--prompt-len", type=_positive_int, default=12)
    d.add_argument("--max-len", type=_positive_int, default=64, help="KV cache length")
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--upcast", action="store_true", help="float32 activations")
    d.add_argument("--backend", default=None, help="auto, gpu, tpu, interpret, tpu-interpret")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="kernel benchmarks on this device (ratio vs XLA)")
    b.add_argument("--only", default="matmul,rows,attn")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--json-out", default=None)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "temperature", 0.0) < 0:
            raise CliError(f"--temperature must be >= 0; got {args.temperature}")
        return args.func(args)
    except CliError as e:
        if args.debug:
            raise
        print(f"detjax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line by default, traceback with --debug
        if args.debug:
            raise
        print(f"detjax: error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
