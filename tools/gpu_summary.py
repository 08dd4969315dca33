"""The GPU check's one table: issue 7's goals against what ``tools/gpu_check.sh`` measured.

Reads the JSON files the check's benchmarks write into its output folder (any may be missing:
a part cut by its time limit, or not run) and prints one row per goal, then the training
variants side by side:

* ``train.json`` (``tools/bench_train.py --json``): sphinx-tiny's MFU (goal 45%) and the packed
  run's tokens/s against ``--no-packing --no-skip`` (goal 1.5x);
* ``pack.json`` (``tools/bench_pack_kernel.py --json``): the pack kernel's bandwidth as a share
  of a device-to-device copy of the same bytes (goal 80%);
* ``images.json`` (``tools/bench_data.py --json``): DALI ``mixed`` decode + transform images/s
  at 448 px (goal 3,000), beside Pillow on all CPU cores;
* ``log.txt`` (every part's output): the GPU tests of Transformer Engine's layer spec against
  the local spec and of FP8 (pytest's ``-rA`` lines of ``tests/test_gpu.py``): passed, failed,
  or skipped with the reason.

Usage::

    python tools/gpu_summary.py /tmp/gpu_check
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Issue 7's targets.
GOALS = {"mfu": 0.45, "packed_vs_reference": 1.5, "pack_pct_copy": 80.0, "dali_per_s": 3000.0}


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _median_step_mfu(r: dict) -> str:
    """The MFU of the median step after the warm-up (the table's MFU is over all of them: one
    slow step, e.g. new encoder shapes, counts in full there)."""
    steps = r.get("step_tflops", [])[r.get("warmup_steps", 0):]
    if not steps or not r.get("mfu"):
        return "-"
    peak = r["tflops_per_gpu"] / r["mfu"]
    return f"{100 * statistics.median(steps) / peak:.1f}%"


def training_rows(train: list[dict] | None) -> tuple[list[tuple], list[str]]:
    """Goal rows for MFU and packed vs reference, and the variants' lines."""
    if not train:
        why = "not measured (no train.json)"
        return [("sphinx-tiny MFU, one GPU, bf16", "45%", why, "-"),
                ("packed vs --no-packing --no-skip, tokens/s", "1.5x", why, "-")], []
    ok = {r["variant"]: r for r in train if "error" not in r}
    # the goal is bf16's: FP8 rows are listed below, not counted for it
    packed = [r for r in ok.values()
              if r["variant"] != "reference" and "fp8" not in r["variant"] and r.get("mfu")]
    rows = []
    if packed:
        best = max(packed, key=lambda r: r["mfu"])
        default = ok.get("packed")
        said = f"{100 * best['mfu']:.1f}% ({best['variant']})"
        if default is not None and default is not best:
            said += f"; default packed {100 * default['mfu']:.1f}%"
        rows.append(("sphinx-tiny MFU, one GPU, bf16", "45%", said,
                     "yes" if best["mfu"] >= GOALS["mfu"] else "no"))
    else:
        rows.append(("sphinx-tiny MFU, one GPU, bf16", "45%", "not measured (no packed row "
                     "with an MFU)", "-"))
    if "packed" in ok and "reference" in ok:
        a, b = ok["packed"]["tokens_per_s"], ok["reference"]["tokens_per_s"]
        rows.append(("packed vs --no-packing --no-skip, tokens/s", "1.5x",
                     f"{a / b:.2f}x ({a:,.0f} vs {b:,.0f})",
                     "yes" if a / b >= GOALS["packed_vs_reference"] else "no"))
    else:
        rows.append(("packed vs --no-packing --no-skip, tokens/s", "1.5x",
                     "not measured (needs the packed and reference rows)", "-"))
    lines = []
    for r in train:
        if "error" in r:
            lines.append(f"{r['variant']:28s} failed ({r['error']})")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['max_memory_gib']:.1f}" if r.get("max_memory_gib") is not None else "-"
        lines.append(f"{r['variant']:28s} {r['step_s']:7.3f} {r['tokens_per_s']:10,.0f} "
                     f"{r['tflops_per_gpu']:8.1f} {mfu:>6s} {_median_step_mfu(r):>8s} "
                     f"{mem:>8s}")
    return rows, lines


def pack_row(pack: dict | None) -> tuple:
    """The goal row of the pack kernel: its share of copy bandwidth over every case."""
    goal = "pack kernel bandwidth, % of a d2d copy"
    if not pack or not pack.get("cases"):
        return (goal, "80%", "not measured (no pack.json)", "-")
    impl = next((k for k in ("cuda", "triton") if k in pack["cases"][0]["impls"]), None)
    if impl is None:
        return (goal, "80%", "not measured (no CUDA or Triton kernel ran)", "-")
    pcts = [c["impls"][impl]["pct_copy"] for c in pack["cases"]]
    return (goal, "80%", f"{min(pcts):.0f}-{max(pcts):.0f}% ({impl}, {len(pcts)} shapes)",
            "yes" if min(pcts) >= GOALS["pack_pct_copy"] else "no")


def dali_row(images: dict | None) -> tuple:
    """The goal row of DALI mixed: its best images/s, the share DALI decoded, and Pillow's."""
    goal = "DALI mixed images/s, 448 px"
    if not images:
        return (goal, "3,000", "not measured (no images.json)", "-")
    dali_gpu = [r for r in images["rows"] if r["pipeline"].startswith("DALI gpu")]
    gpu = [r for r in dali_gpu if r["by_dali"] != "-"]  # "-": DALI's runs alone, no views made
    alone = next((r for r in dali_gpu if r["by_dali"] == "-"), None)
    pillow = max((r["best_per_s"] for r in images["rows"] if r["pipeline"].startswith("Pillow")),
                 default=None)
    beside = f"; Pillow {pillow:,.0f} on {images['threads']} threads" if pillow else ""
    if alone:  # what DALI itself reaches: the bound of any overlap with the views
        beside = f"; DALI's runs alone {alone['best_per_s']:,.0f}{beside}"
    if not gpu:
        return (goal, "3,000", "not measured (DALI ran on the CPU)" + beside, "-")
    best = max(gpu, key=lambda r: r["best_per_s"])
    return (goal, "3,000", f"{best['best_per_s']:,.0f} ({best['pipeline']}, by DALI "
            f"{best['by_dali']}){beside}",
            "yes" if best["best_per_s"] >= GOALS["dali_per_s"] and best["by_dali"] == "100%"
            else "no")


#: The Transformer Engine tests of ``tests/test_gpu.py`` (the issue's TE goal).
TE_TESTS = {"test_te_spec_matches_local_spec": "TE vs local",
            "test_te_grouped_experts_match_local_experts": "MoE grouped GEMM",
            "test_te_fp8_tracks_te_bf16": "FP8"}


def te_row(log: str | None) -> tuple:
    """The goal row of the TE tests, from the check's log (pytest ``-rA`` summary lines)."""
    goal = "TE layer spec vs local spec; FP8"
    if log is None:
        return (goal, "pass", "not measured (no log.txt)", "-")
    said = []
    for name, label in TE_TESTS.items():
        m = re.search(rf"^(PASSED|FAILED|ERROR) tests/test_gpu.py::{name}\b", log, re.M)
        said.append(f"{label} {m.group(1).lower()}" if m else None)
    if all(s is None for s in said):
        skip = re.search(r"^SKIPPED \[\d+\] tests/test_gpu.py:\d+: (.*(?:Transformer Engine|"
                         r"FP8).*)$", log, re.M)
        return (goal, "pass", f"not run ({skip.group(1) if skip else 'no result in log.txt'})",
                "-")
    met = all(s is not None and s.endswith("passed") for s in said)
    return (goal, "pass", "; ".join(s or f"{label} not run"
                                    for s, label in zip(said, TE_TESTS.values())),
            "yes" if met else "no")


def summary(folder: Path) -> str:
    """The table, as text."""
    train, pack, images = (_load(folder, n) for n in ("train.json", "pack.json",
                                                      "images.json"))
    device = next((d["device"] for d in (pack, images) if d and d.get("device")), None)
    rows, lines = training_rows(train)
    log = folder / "log.txt"
    rows += [pack_row(pack), dali_row(images),
             te_row(log.read_text(errors="replace") if log.is_file() else None)]
    out = [f"## Issue 7's goals{f', {device}' if device else ''} (from {folder})",
           f"{'goal':44s} {'target':>6s}  {'met':3s}  measured"]
    out += [f"{g:44s} {t:>6s}  {m:3s}  {said}" for g, t, said, m in rows]
    if lines:
        out += ["", f"{'training variant':28s} {'step s':>7s} {'tokens/s':>10s} {'TFLOP/s':>8s} "
                f"{'MFU':>6s} {'step MFU':>8s} {'peak GiB':>8s}", *lines,
                "(MFU: over all steps after the warm-up; step MFU: their median step's; the "
                "goal counts bf16 rows by MFU)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="the GPU check's output folder ($OUT)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        p.error(f"{folder} is not a folder: give the GPU check's output folder ($OUT)")
    print(summary(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
