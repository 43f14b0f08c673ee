"""The ``detjax`` command line.

``detjax demo``: the reproducibility experiment, plain XLA against detjax side by side.
``detjax bench``: the kernel benchmark table on the current device.
``detjax check MODULE:FUNCTION``: ``detjax.check.batch_invariance`` on random example arguments
(exit 0 if every guarantee holds bitwise, 1 if not, 2 on bad input).
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


def _use_backend(name):
    """Validate ``--backend`` and make it the process default (DETJAX_BACKEND)."""
    if name is None:
        return
    import os
    import detjax
    try:
        detjax.chosen_backend(name)
    except ValueError as e:
        raise CliError(str(e)) from None
    os.environ["DETJAX_BACKEND"] = name


def cmd_demo(args):
    import jax
    import numpy as np
    import detjax
    _use_backend(args.backend)
    on_gpu = jax.default_backend() == "gpu"
    args.model = args.model or ("small" if on_gpu else "tiny")
    args.num_samples = args.num_samples or (16 if on_gpu else 4)
    args.max_new_tokens = args.max_new_tokens or (32 if on_gpu else 8)
    need = args.prompt_len + args.max_new_tokens
    if args.max_len < need:
        raise CliError(f"--max-len {args.max_len} is too small: --prompt-len + --max-new-tokens "
                       f"needs {need}")
    from detjax.generate import MAX_LEN_LIMIT
    if args.max_len > MAX_LEN_LIMIT:
        raise CliError(f"--max-len {args.max_len} is too large (positions are int32: at most "
                       f"{MAX_LEN_LIMIT})")
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


CHECK_DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8", "bool")


def _int_list(text, what, lo=1):
    """``"1,2,7"`` -> ``[1, 2, 7]``; a CliError (one line) on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise CliError(f"{what}: expected comma-separated integers like 1,2,7; got {text!r}")
    out = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise CliError(f"{what}: {p!r} is not an integer (in {text!r})") from None
        if v < lo:
            raise CliError(f"{what}: expected integers >= {lo}; got {v} (in {text!r})")
        out.append(v)
    return out


def _load_function(spec):
    """``MODULE:FUNCTION`` (``FUNCTION`` may be dotted, ``MODULE`` may be a path to a .py file)."""
    import importlib
    import importlib.util
    import os
    if spec.count(":") < 1 or spec.startswith(":") or spec.endswith(":"):
        raise CliError(f"expected MODULE:FUNCTION (e.g. mypkg.model:forward); got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            if not os.path.isfile(mod_name):
                raise CliError(f"cannot import {mod_name!r}: no such file")
            name = os.path.splitext(os.path.basename(mod_name))[0]
            sp = importlib.util.spec_from_file_location(name, mod_name)
            module = importlib.util.module_from_spec(sp)
            sys.modules[name] = module
            sp.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the import raises is the user's input
        first = str(e).splitlines()[0] if str(e) else ""
        raise CliError(f"cannot import module {mod_name!r}: {type(e).__name__}: {first}") from e
    obj = module
    for part in attr.split("."):
        if not part.isidentifier() or not hasattr(obj, part):
            raise CliError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _random_args(shapes, dtype, seed, int_high):
    import numpy as np
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        if dtype == "bool":
            a = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.startswith(("int", "uint")):
            a = rng.integers(0, int_high, size=shape)
        else:
            a = rng.standard_normal(shape)
        out.append(jnp.asarray(a, dtype))
    return out


def cmd_check(args):
    _use_backend(args.backend)
    shapes = [_int_list(s, "--args-shape", lo=1) for spec in (args.args_shape or ["4,16"])
              for s in spec.split(";")]
    if len({s[0] for s in shapes}) != 1:
        raise CliError("--args-shape: every argument needs the same leading (batch) dimension; got "
                       + " ".join(",".join(map(str, s)) for s in shapes))
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes", lo=1)
    positions = None if args.positions is None else _int_list(args.positions, "--positions", lo=0)
    n_runs = _int_list(args.runs, "--runs", lo=1)
    if len(n_runs) != 1:
        raise CliError(f"--runs: expected one integer; got {args.runs!r}")
    seed = _int_list(args.seed, "--seed", lo=0)
    if len(seed) != 1:
        raise CliError(f"--seed: expected one integer; got {args.seed!r}")
    int_high = _int_list(args.int_high, "--int-high", lo=1)[0]
    dtype = args.dtype.strip().lower()
    if dtype not in CHECK_DTYPES:
        raise CliError(f"--dtype: expected one of {', '.join(CHECK_DTYPES)}; got {args.dtype!r}")
    fn = _load_function(args.function)
    if dtype == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)
    from detjax import check
    ex = _random_args(shapes, dtype, seed[0], int_high)
    try:
        import jax
        jax.eval_shape(fn, *ex)
    except Exception as e:  # noqa: BLE001 - the arguments do not fit the function
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        shp = " ".join(",".join(map(str, s)) for s in shapes)
        raise CliError(f"{args.function} cannot be called with {dtype} arguments of shape {shp}: "
                       f"{type(e).__name__}: {first}") from None
    report = check.batch_invariance(fn, *ex, batch_sizes=batch_sizes, positions=positions,
                                    n_runs=n_runs[0])
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report)
    return 0 if report.ok else 1


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
    c = sub.add_parser(
        "check", help="check a function's batch / vmap / run-to-run invariance bitwise",
        description="Import FUNCTION from MODULE, call it on random example arguments batched along "
                    "axis 0, and check bitwise that every example gives the same bits alone, inside "
                    "batches of several sizes at several positions, under jax.vmap, and run to run "
                    "(detjax.check.batch_invariance). Exit status: 0 all guarantees hold, 1 some do "
                    "not, 2 bad input.")
    c.add_argument("function", metavar="MODULE:FUNCTION",
                   help="e.g. mypkg.model:forward, or path/to/file.py:forward")
    c.add_argument("--args-shape", action="append", default=None, metavar="N,D,...",
                   help="shape of one argument, leading dim = number of examples; repeat the flag "
                        "(or separate with ';') for several arguments (default 4,16)")
    c.add_argument("--dtype", default="float32", help=f"one of {', '.join(CHECK_DTYPES)}")
    c.add_argument("--batch-sizes", default="1,2,7", help="comma-separated (default 1,2,7)")
    c.add_argument("--positions", default=None,
                   help="rows of example 0 inside each batch (default 0, B//2, B-1)")
    c.add_argument("--runs", default="2", help="run-to-run repetitions (default 2)")
    c.add_argument("--seed", default="0", help="seed of the random arguments")
    c.add_argument("--int-high", default="256", help="integer arguments are drawn from [0, this)")
    c.add_argument("--backend", default=None, help="auto, gpu, tpu, interpret, tpu-interpret")
    c.add_argument("--json", action="store_true", help="machine-readable report")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks (same as detjax --debug check ...)")
    c.set_defaults(func=cmd_check)
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
