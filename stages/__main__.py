"""Command line: ``python -m stages`` (also installed as ``fuse``).

Exit codes: 0 success; 1 a stage failed or outputs do not verify; 2 the pipeline file,
the arguments or the inputs are wrong. User mistakes print one finding line (an
``::error`` annotation under GitHub Actions), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .findings import FuseError, render

EXIT_FAILED, EXIT_USAGE = 1, 2
USAGE_CODES = ("F1", "F2", "F408", "F509")  # pipeline-file, input and workdir-entry findings: the user must change something first


def _quiet_third_party_logs():
    """Optional kernels that cannot load on this machine (torchao's CUDA builds, bitsandbytes' CPU
    kernel from the Hub) and deprecation chatter of torch internals are not the user's problem: keep
    them out of the run's log. A log that is not a terminal (CI) gets no carriage-return progress
    bars from transformers or huggingface_hub (Fuse prints its own progress lines there)."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv=None) -> int:
    """Every line printed passes the one redaction rule (stages/secrets.py), a library's too."""
    from .secrets import RedactingStream

    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(out), RedactingStream(err)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err


def _main(argv=None) -> int:
    _quiet_third_party_logs()
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except FuseError as e:
        print(render(e.finding), file=sys.stderr)
        if os.environ.get("FUSE_DEBUG") and e.finding.extra.get("traceback"):
            print("".join(e.finding.extra["traceback"]), file=sys.stderr)
        return EXIT_USAGE if e.finding.code.startswith(USAGE_CODES) else EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; run again to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="fuse", description="Fuse: validate -> merge -> check -> quantize -> export -> "
                                "publish a base model + PEFT adapter, declared in pipeline.yaml. Exit codes: 0 done; "
                                "1 a stage failed or outputs do not verify; 2 the pipeline file, the arguments or "
                                "the inputs are wrong.")
    p.add_argument("--version", action="version", version=f"fuse {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a pipeline (fresh stages are skipped)")
    r.add_argument("pipeline")
    r.add_argument("--from", dest="from_id", metavar="ID", help="start at this stage (earlier ones must be done)")
    r.add_argument("--until", metavar="ID", help="stop after this stage (with --from: a slice of the pipeline)")
    r.add_argument("--only", metavar="ID", help="run this stage alone (its upstream must be done)")
    r.add_argument("--force", action="store_true", help="re-run the selected stages even if fresh")
    r.add_argument("--full-verify", action="store_true", help="re-hash recorded outputs instead of the stat check")
    _add_set(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="each stage: fresh / stale / failed, and why")
    s.add_argument("pipeline")
    s.add_argument("--json", action="store_true")
    _add_set(s)
    s.set_defaults(func=cmd_status)

    sh = sub.add_parser("show", help="the manifest, readable")
    sh.add_argument("target", help="a pipeline file or a workdir")
    sh.add_argument("--json", action="store_true", help="print the manifest as it is")
    sh.set_defaults(func=cmd_show)

    v = sub.add_parser("verify", help="re-hash every recorded output; non-zero exit on any mismatch")
    v.add_argument("target", help="a workdir (or a pipeline file)")
    v.set_defaults(func=cmd_verify)

    su = sub.add_parser("summary", help="a run's summary as markdown (--github: job summary + action outputs)")
    su.add_argument("target", help="a pipeline file or a workdir")
    su.add_argument("--github", action="store_true", help="append to $GITHUB_STEP_SUMMARY, write $GITHUB_OUTPUT")
    su.add_argument("--json", action="store_true", help="print the outputs (status, manifest, model-dir, ...)")
    su.add_argument("--exit-code", type=int, default=None, help="exit status of the run being reported")
    su.add_argument("--stages-file", default=None, help="what that run did ($FUSE_STAGES_OUTPUT of the run)")
    _add_set(su)
    su.set_defaults(func=cmd_summary)

    pa = sub.add_parser("params", help="every parameter of each stage (or of the stages named), as markdown")
    pa.add_argument("stages", nargs="*", metavar="STAGE")
    pa.set_defaults(func=cmd_params)

    m = sub.add_parser("merge", help="one-shot merge of BASE + ADAPTER into OUT, no pipeline (metrics as JSON "
                       "on stdout)", description="Merge one adapter into a base and write a standalone Hugging Face "
                       "model directory. Prints the merge's metrics as JSON on stdout; progress and findings go to "
                       "stderr. Exit 2 on a bad input, with one finding line.")
    m.add_argument("base", help="the base model: a local directory, a .gguf file, or a Hub id org/name[@revision]")
    m.add_argument("adapter", help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("out", help="the output directory: new or empty; never inside the base or the adapter")
    m.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the merged weights (auto: the base's)")
    m.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    m.add_argument("--memory-budget", default="600MB", help="whole-process peak memory the merge aims for")
    m.set_defaults(func=cmd_merge)
    return p


def _add_set(p):
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID.PARAM=VALUE",
                   help="override a stage parameter, e.g. --set merge.dtype=float16 (repeatable)")


def cmd_run(args) -> int:
    from . import run
    from .report import stage_log

    with stage_log() as log:  # under GitHub Actions: secrets masked, one log group per stage
        summary = run(args.pipeline, overrides=args.overrides, from_stage=args.from_id, until=args.until,
                      only=args.only, force=args.force, full_verify=args.full_verify, log=log)
    ran = [k for k, v in summary.items() if v == "done"]
    print(f"fuse: {len(summary)} stages, {len(ran)} ran, {len(summary) - len(ran)} fresh and skipped", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    from . import status

    rows = status(args.pipeline, overrides=args.overrides)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("ID", "STAGE", "STATE", "TIME", "WHY")
    table = [header] + [(r["id"], r["stage"], r["state"], f"{r['seconds']:.1f}s" if r["seconds"] is not None else "-",
                         r["why"] + (f" [{r['error']}]" if r.get("error") else "")) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _workdir(target: str) -> Path:
    p = Path(target)
    if p.is_file():
        from .pipeline import load

        return load(p).workdir
    return p


def cmd_show(args) -> int:
    from .manifest import Manifest

    m = Manifest.load(_workdir(args.target))
    if not m.path.exists():
        raise FuseError("F404", "no manifest.json: this pipeline has not run yet", file=m.path,
                        fix="run it first: python -m stages run PIPELINE")
    if args.json:
        print(json.dumps(m.data, indent=2, sort_keys=True))
        return 0
    d = m.data
    print(f"manifest   {m.path}")
    print(f"run        {d.get('run_id')} started {d.get('started_at')} (previous {d.get('previous_run_id')})")
    print(f"pipeline   {d.get('pipeline', {}).get('path')} sha256 {d.get('pipeline', {}).get('sha256', '')[:16]}")
    print(f"tool       {d.get('tool', {}).get('name')} {d.get('tool', {}).get('version')}, python {d.get('python')}")
    print("libraries  " + ", ".join(f"{k} {v}" for k, v in sorted(d.get("libraries", {}).items())))
    if d.get("ci"):
        print("ci         " + ", ".join(f"{k}={v}" for k, v in sorted(d["ci"].items())))
    for sid, rec in _in_pipeline_order(m):
        outs = rec.get("outputs", [])
        size = sum(f["size"] for f in outs)
        secs = f"{rec['seconds']:.1f}s" if rec.get("seconds") is not None else "-"
        print(f"\n[{sid}] {rec.get('stage')} v{rec.get('version')}: {rec.get('status')} in {secs}")
        print(f"  fingerprint {rec.get('fingerprint')}")
        for k, v in sorted((rec.get("params") or {}).items()):
            _show_value("param", k, v)
        inputs = rec.get("fingerprint_inputs", {}).get("inputs", {})
        sources = rec.get("sources", {})
        if inputs.get("base"):
            b = inputs["base"]
            print(f"  base        {sources.get('base', {}).get('name', '?')} ({b.get('kind')}) {b.get('digest', '')[:23]}"
                  + (f" @ {b['revision']}" if b.get("revision") else ""))
        for a, path in zip(inputs.get("adapters", []), sources.get("adapters", [])):
            print(f"  adapter     {path} x{a['weight']} {a['digest'][:23]}")
        if inputs.get("upstream"):
            print(f"  reads       {inputs['upstream']['id']} {str(inputs['upstream']['digest'])[:23]}")
        if outs:
            print(f"  outputs     {len(outs)} files, {size / 1e6:.1f} MB in {m.workdir / rec.get('output_dir', sid)}")
            for f in outs:
                print(f"    {f['sha256'][:16]}  {f['size']:>12}  {f['path']}")
        if rec.get("external"):
            print(f"  published   {len(rec['external']['files'])} files to {rec['external']['root']}")
        for k, v in (rec.get("metrics") or {}).items():
            _show_value("metric", k, v)
        for w in rec.get("warnings", []):
            print(f"  warning     {w.get('code')} {w.get('message')}")
        if rec.get("error"):
            print(f"  error       {rec['error'].get('code')} {rec['error'].get('message')}")
    return 0


def _in_pipeline_order(m) -> list[tuple[str, dict]]:
    """Stage records in the order of the pipeline that last ran (the manifest's JSON keeps them sorted by
    id); records of stages no longer in it follow, by start time."""
    order = [s.get("id") for s in (m.data.get("pipeline") or {}).get("resolved", {}).get("stages", [])
             if isinstance(s, dict)]
    rank = {sid: i for i, sid in enumerate(order)}
    return sorted(m.stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), str(kv[1].get("started_at") or ""),
                                                    kv[0]))


def _show_value(label: str, key: str, value, indent: int = 2) -> None:
    """``label key = value``; a dict (or a long list) goes one entry a line, indented under its key."""
    head = f"{' ' * indent}{label:<11} {key}" if label else f"{' ' * indent}{key}"
    inner = len(head) - len(key) + 2
    if isinstance(value, dict) and value:
        print(head + ":")
        for k, v in value.items():
            _show_value("", k, v, inner)
    elif isinstance(value, list) and len(str(value)) > 80:
        print(head + ":")
        for v in value:
            print(f"{' ' * inner}- {v}")
    else:
        print(f"{head} = {value}")


def cmd_verify(args) -> int:
    from . import verify

    workdir = _workdir(args.target)
    problems = verify(workdir)
    for p in problems:
        print(render(_finding("F403", p, str(workdir))), file=sys.stderr)
    if problems:
        return EXIT_FAILED
    print(f"fuse: every recorded output in {workdir} matches its sha256", file=sys.stderr)
    return 0


def cmd_params(args) -> int:
    from .pipeline import STAGE_MODULES, params_reference

    unknown = [n for n in args.stages if n not in STAGE_MODULES]
    if unknown:
        raise FuseError("F108", f"no stage named {unknown[0]!r}", fix="stages: " + ", ".join(STAGE_MODULES))
    print(params_reference(args.stages or None))
    return 0


def cmd_summary(args) -> int:
    from .report import cli

    return cli(args)


def _finding(code, message, file):
    from .findings import Finding

    return Finding(code=code, message=message, file=file, fix="re-run the stage that wrote it (run --force)")


def cmd_merge(args) -> int:
    from . import merge

    metrics = merge(args.base, args.adapter, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    memory_budget=args.memory_budget)
    print(json.dumps(metrics, indent=2))  # stdout: for scripts (progress and findings are on stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
