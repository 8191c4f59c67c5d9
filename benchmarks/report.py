"""One report per run, in the forms people use: a terminal table, JSON, Markdown and PNG plots.

Everything is rendered from the JSON document (`Report.as_dict()`), so a script reading the JSON
sees exactly the figures the tables show. Keys are plain (`img_s`, `p99_ms`, `ratio_to_ceiling`,
`top1`). Every rendering starts with the machine, because a figure without it means nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ceiling import Ceiling
from benchmarks.machine import Machine
from benchmarks.sweep import TargetResult
from core.atomic import atomic_path, atomic_write_text

Table = tuple[list[str], list[list[str]]]  # header, rows


@dataclass
class Report:
    mode: str
    machine: Machine
    command: str
    note: str = ""  # the conditions, e.g. "shared machine: other jobs were running"
    started: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    workload: dict[str, Any] = field(default_factory=dict)
    ceilings: list[Ceiling] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # the mode's own results: "batching", "peers", ...

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "started": self.started,
            "command": self.command,
            "note": self.note,
            "machine": {**dataclasses.asdict(self.machine), "description": self.machine.describe()},
            "workload": self.workload,
            "ceilings": [c.as_dict() for c in self.ceilings],
            "targets": [t.as_dict() for t in self.targets],
            **self.extra,
        }


def write(report: dict[str, Any], json_path: Path | None, report_dir: Path | None) -> list[Path]:
    """The JSON at `json_path`; the Markdown, the PNGs and the JSON again in `report_dir`."""
    written = []
    text = json.dumps(report, indent=2) + "\n"
    if json_path:
        atomic_write_text(json_path, text)
        written.append(json_path)
    if report_dir:
        stem = report["mode"]
        plots = write_plots(report, report_dir, stem)
        atomic_write_text(report_dir / f"{stem}.json", text)
        atomic_write_text(report_dir / f"{stem}.md", markdown(report, [p.name for p in plots]))
        written += [report_dir / f"{stem}.md", report_dir / f"{stem}.json", *plots]
    return written


# --- tables -----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ceiling_table(ceilings: Sequence[dict[str, Any]]) -> Table:
    """Batch sizes down, one img/s and p50 column pair per model file: files side by side."""
    header = ["batch"]
    for c in ceilings:
        name = Path(c["model"]).name
        header += [f"{name} img/s", "p50 ms", "CPU cores", "img/CPU-s"]
    sizes = sorted({b["batch"] for c in ceilings for b in c["batches"]})
    rows = []
    for size in sizes:
        row = [str(size)]
        for c in ceilings:
            timing = next((b for b in c["batches"] if b["batch"] == size), None)
            row += (
                [_f(timing["img_s"]), _f(timing["p50_ms"]), _f(timing["cpu"], 2), _f(timing["img_per_cpu_s"])]
                if timing
                else ["-"] * 4
            )
        rows.append(row)
    rows.append(
        ["best", *(x for c in ceilings for x in (_f(c["best_img_s"]), f"b{c['best_batch']}", "", ""))]
    )
    return header, rows


LEVEL_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("img/s", "img_s", _f),
    ("req/s", "req_s", _f),
    ("p50 ms", "p50_ms", _f),
    ("p90 ms", "p90_ms", _f),
    ("p99 ms", "p99_ms", _f),
    ("p99.9 ms", "p999_ms", _f),
    ("max ms", "max_ms", _f),
    ("queue ms", "queue_ms", _f),
    ("compute ms", "compute_ms", _f),
    ("mean batch", "mean_batch", lambda v: _f(v, 2)),
    ("batches run", "batch_sizes", lambda v: _batches(v)),
    ("server CPU", "server_cpu", lambda v: _f(v, 2)),
    ("img/CPU-s", "img_per_cpu_s", _f),
    ("load gen CPU", "loadgen_cpu", lambda v: _f(v, 2)),
    ("/ceiling", "ratio_to_ceiling", _ratio),
)


def _batches(sizes: dict[str, int] | None) -> str:
    """The most run batch sizes, "15x12 1x12": a mean hides a batcher alternating big and small."""
    if not sizes:
        return "-"
    common = sorted(sizes.items(), key=lambda kv: (-kv[1], -int(kv[0])))[:3]
    return " ".join(f"{size}x{count}" for size, count in common) + (" ..." if len(sizes) > 3 else "")


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in errors.items()) or "0"


def gpu_summary(devices: Sequence[dict[str, float]]) -> str:
    """ "0: 87% 12.3 GiB 310 W" per device: what the GPU did during a level (NVML, sampled)."""
    parts = []
    for d in devices:
        figures = [f"{100 * d['utilization']:.0f}%" if "utilization" in d else ""]
        figures.append(f"{d['memory_used_bytes'] / 2**30:.1f} GiB" if "memory_used_bytes" in d else "")
        figures.append(f"{d['power_watts']:.0f} W" if "power_watts" in d else "")
        parts.append(f"{d['gpu']:.0f}: " + " ".join(f for f in figures if f))
    return ", ".join(parts) or "-"


def level_table(target: dict[str, Any]) -> Table:
    gpus = any(lv.get("gpu") for lv in target["levels"])
    header = [
        "load",
        *(c[0] for c in LEVEL_COLUMNS),
        "errors",
        *(["GPU util, memory, power"] if gpus else []),
    ]
    rows = [
        [
            level_label(lv),
            *(fmt(lv[key]) for _, key, fmt in LEVEL_COLUMNS),
            _errors(lv["errors"]),
            *([gpu_summary(lv.get("gpu", ()))] if gpus else []),
        ]
        for lv in target["levels"]
    ]
    return header, rows


def level_label(level: dict[str, Any]) -> str:
    """ "16 callers" (closed loop) or "40 req/s" (open loop, offered)."""
    n = level["concurrency"]
    return f"{n} caller{'s' if n != 1 else ''}" if n else f"{level['rate']:g} req/s"


def peers_table(report: dict[str, Any]) -> Table:
    ours, *peers = report["targets"]
    header = ["load", f"{ours['label']} img/s"]
    for peer in peers:
        header += [f"{peer['label']} img/s", "speed-up"]
    header += [f"{ours['label']} p99 ms", *(f"{p['label']} p99 ms" for p in peers)]
    rows = []
    for i, level in enumerate(ours["levels"]):
        row = [level_label(level), _f(level["img_s"])]
        for peer in peers:
            theirs = peer["levels"][i]
            speedup = level["img_s"] / theirs["img_s"] if theirs["img_s"] else None
            row += [_f(theirs["img_s"]), "-" if speedup is None else f"{speedup:.2f}x"]
        row += [_f(level["p99_ms"]), *(_f(p["levels"][i]["p99_ms"]) for p in peers)]
        rows.append(row)
    return header, rows


def paired_table(paired: dict[str, Any]) -> Table:
    header = ["pair", "first", "ceiling img/s", "server img/s", "/ceiling"]
    rows = [
        [
            str(i),
            "server" if pair["server_first"] else "ceiling",
            _f(pair["ceiling_img_s"]),
            _f(pair["server_img_s"]),
            _ratio(pair["ratio_to_ceiling"]),
        ]
        for i, pair in enumerate(paired["pairs"], 1)
    ]
    return header, rows


def batching_table(batching: dict[str, Any]) -> Table:
    header = ["setting", "img/s (median)", "range", "p50 ms", "p99 ms", "mean batch", "/ceiling"]
    rows = [
        [
            s["label"],
            _f(s["img_s"]),
            f"{_f(min(s['runs_img_s']))}-{_f(max(s['runs_img_s']))}",
            _f(s["p50_ms"]),
            _f(s["p99_ms"]),
            _f(s["mean_batch"], 2),
            _ratio(s["ratio_to_ceiling"]),
        ]
        for s in batching["settings"]
    ]
    return header, rows


def overhead_table(summary: Sequence[dict[str, Any]]) -> Table:
    header = ["payload", "--workers", "event loop", "req/s", "batch", "owner", "loop", "instances", "pool"]
    header += ["other", "owner cap req/s", "front ends", "busiest front end", "load gen", "p99 ms", "errors"]
    rows = []
    for r in summary:
        split = r["owner_ms"]
        rows.append(
            [
                r["payload"],
                str(r["serve_workers"]),
                r["event_loop"],
                _f(r["req_s"], 0),
                _f(r["mean_batch"]),
                _f(r["owner_total_ms"], 3),
                *(_f(split.get(k), 3) for k in ("event_loop", "instances", "runtime_pool", "other_threads")),
                _f(r["owner_cap_req_s"], 0),
                _f(r["front_ends_ms"], 3),
                _percent(r.get("busiest_front_end")),
                _f(r["loadgen_ms"], 3),
                _f(r["p99_ms"]),
                _errors(r["errors"]),
            ]
        )
    return header, rows


def meets(level: dict[str, Any], p99_ms: float) -> bool:
    """Whether a level ran without errors and its p99 met `p99_ms`."""
    return level["p99_ms"] is not None and level["p99_ms"] <= p99_ms and not level["errors"]


def best_level(levels: Sequence[dict[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """The level with the most img/s among those that met `p99_ms`."""
    return max((lv for lv in levels if meets(lv, p99_ms)), key=lambda lv: lv["img_s"], default=None)


def at_target(levels: Sequence[dict[str, Any]], p99_ms: float) -> float:
    """Closed-loop img/s at the p99 target: the best level that met it, or more where the next
    level up (in callers) missed it on latency alone and did more img/s: the line between the
    two read at the target. The p99 of a few seconds is the few slowest requests, so a level near
    the target meets or misses it by chance, and scoring the levels alone jumps by the whole step
    between them (8 callers or 11) on that chance. The line moves little when a p99 moves a little.
    """
    best = best_level(levels, p99_ms)
    score = best["img_s"] if best else 0.0
    ladder = sorted((lv for lv in levels if lv["concurrency"]), key=lambda lv: lv["concurrency"])
    for low, high in itertools.pairwise(ladder):
        if not meets(low, p99_ms) or meets(high, p99_ms) or high["errors"] or high["p99_ms"] is None:
            continue
        if high["img_s"] > low["img_s"] and high["p99_ms"] > low["p99_ms"]:
            share = (p99_ms - low["p99_ms"]) / (high["p99_ms"] - low["p99_ms"])
            score = max(score, low["img_s"] + share * (high["img_s"] - low["img_s"]))
    return score


def tune_table(tune: dict[str, Any]) -> Table:
    header = [
        "candidate",
        "img/s at p99 target",
        "best level: img/s",
        "callers",
        "p99 ms",
        "CPU ms/img",
        "batch",
        "levels",
        "s",
        "steal, most",
    ]
    gpus = any(lv.get("gpu") for m in tune["candidates"] for lv in m["levels"])
    header += ["GPU util, memory, power"] if gpus else []
    rows = []
    for m in tune["candidates"]:
        best = best_level(m["levels"], tune["p99_ms"])
        mark = (
            " (chosen)" if m["key"] == tune["chosen"] else " (default)" if m["key"] == tune["default"] else ""
        )
        cells = ["-"] * 6
        if best:
            cells = [
                _f(at_target(m["levels"], tune["p99_ms"])),
                _f(best["img_s"]),
                str(best["concurrency"]),
                _f(best["p99_ms"]),
                _f(best["cpu_ms_per_img"], 2),
                _f(best["mean_batch"]),
            ]
        elif m["error"]:
            cells[0] = "did not start"
        row = [m["key"] + mark, *cells, str(len(m["levels"])), _f(m["seconds"], 0), _most_steal(m["levels"])]
        rows.append(row + ([gpu_summary(best.get("gpu", ()) if best else ())] if gpus else []))
    return header, rows


def _steals(levels: Sequence[dict[str, Any]]) -> list[float]:
    """The steal shares the levels read (none where the kernel did not say)."""
    return [lv["steal"] for lv in levels if lv.get("steal") is not None]


def _most_steal(levels: Sequence[dict[str, Any]]) -> str:
    steals = _steals(levels)
    return f"{max(steals):.0%}" if steals else "-"


def _steal_line(tune: dict[str, Any]) -> str | None:
    """How much of the CPU the hypervisor took while the tune measured: what a figure that would
    not reproduce is read against."""
    v = tune["verify"]
    search = [lv for m in (*tune["candidates"], *tune.get("confirmed", [])) for lv in m["levels"]]
    check = [lv for m in (*v["default_runs"], *v["chosen_runs"]) for lv in m["levels"]]
    check += [*v["certify"].get("chosen", []), *([v["certify"]["default"]] if v["certify"] else [])]
    steals = _steals([*search, *check])
    if not steals:
        return None

    def mean(levels: list[dict[str, Any]]) -> str:
        known = _steals(levels)
        return f"{sum(known) / len(known):.1%}" if known else "-"

    again = sum(lv.get("remeasured", 0) for lv in (*search, *check))
    return (
        f"CPU taken by the hypervisor (steal): {mean(search)} in the search, {mean(check)} in the check "
        f"(means over levels), at most {max(steals):.0%} in one level; {again} readings taken again for "
        f"steal over {tune.get('steal_limit', 0):.0%}"
    )


def tune_lines(tune: dict[str, Any]) -> list[str]:
    v = tune["verify"]
    lines = [f"{s['setting']}: {s['verdict']} {s['best']}" for s in tune["steps"]]
    lines += [f"gate, {g['precision']}: {g['summary']}" for g in tune["gates"]]
    for again in tune.get("confirmed", []):
        first = next(m for m in tune["candidates"] if m["key"] == again["key"])
        role = "the defaults" if again["key"] == tune["default"] else "finalist"
        lines.append(
            f"{role} {again['key']}: {_img_s_at_target(first, tune['p99_ms'])} img/s in the search, "
            f"{_img_s_at_target(again, tune['p99_ms'])} measured again"
        )
    runs = ", ".join(f"{_img_s_at_target(m, tune['p99_ms'])}" for m in v["chosen_runs"])
    default_runs = ", ".join(f"{_img_s_at_target(m, tune['p99_ms'])}" for m in v["default_runs"])
    lines += [
        f"written: {tune['config']} (serves {tune['served_model']}), candidate {tune['chosen']}",
        f"checked, alternated: the defaults {default_runs} img/s, the written file {runs} img/s: "
        f"{_ratio(v['speedup'])}x the defaults at p99 <= {tune['p99_ms']:g} ms (medians)",
        f"the written file reproduces {_ratio(v['reproduced'])} of its tuned {_f(tune['tuned_img_s'])} img/s "
        f"(its second reading, after the search); the defaults, measured alike, "
        f"{_ratio(v.get('defaults_reproduced'))} of theirs",
    ]
    c = v["certify"]
    if c:
        tried = ", ".join(
            f"{_f(rate)} img/s p99 {_f(lv['p99_ms'])} ms"
            for rate, lv in zip(c["rates_img_s"], c["chosen"], strict=True)
        )
        held = f"certified for {_f(c['certified_img_s'])} img/s" if c["certified_img_s"] else "not certified"
        d = c["default"]
        lines.append(
            f"open loop, Poisson arrivals: the written file {tried}: {held}; the defaults at "
            f"{_f(c['rates_img_s'][-1])} img/s p99 {_f(d['p99_ms'])} ms ({_errors(d['errors'])} errors)"
        )
    steal = _steal_line(tune)
    lines += [steal] if steal else []
    lines.append(
        f"{len(tune['candidates'])} candidates ({tune['cached']} from the cache {tune['cache']}), "
        f"{len(tune['skipped'])} skipped for the budget; {tune['seconds']:.0f} s of {tune['budget_s']:g}"
    )
    return lines


def _img_s_at_target(measurement: dict[str, Any], p99_ms: float) -> str:
    return _f(at_target(measurement["levels"], p99_ms))


def accuracy_lines(accuracy: dict[str, Any]) -> list[str]:
    lines = [
        f"server: {{'Top_1_Acc': {accuracy['top1']:.4f}, 'Top_5_Acc': {accuracy['top5']:.4f}}}"
        f" over {accuracy['images']} images ({_f(accuracy['img_s'])} img/s, {accuracy['failed']} failed)"
    ]
    if accuracy.get("eval"):
        ev = accuracy["eval"]
        lines.append(
            f"hrnet eval: {{'Top_1_Acc': {ev['top1']:.4f}, 'Top_5_Acc': {ev['top5']:.4f}}} (MindSpore)"
        )
        lines.append(
            f"top-1 agreement with hrnet eval: {accuracy['agreement']:.4f} "
            f"({len(accuracy['differ'])} images differ)"
        )
    return lines


def _plain(table: Table) -> str:
    header, rows = table
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(lines)


def _markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _sections(report: dict[str, Any]) -> list[tuple[str, Table | list[str]]]:
    """(title, table or lines) in reading order; both renderings walk the same list."""
    sections: list[tuple[str, Table | list[str]]] = []
    if report["ceilings"]:
        c = report["ceilings"][0]
        sections.append(
            (
                f"Ceiling: in-process {c['backend'].split()[0]}, {c['device']}, {c['threads']} threads",
                ceiling_table(report["ceilings"]),
            )
        )
    for target in report["targets"]:
        title = f"{target['label']} ({target['address']}, model {target['model']})"
        sections.append((title, level_table(target)))
        lines = [f"{key}: {value}" for key, value in target["settings"].items()]
        if target["img_s"] is not None:
            ratio = target["ratio_to_ceiling"]
            ratio_text = f" = {ratio:.2f} of the ceiling" if ratio is not None else ""
            lines.append(
                f"saturation: {target['img_s']:.1f} img/s at {target['saturation_level']}{ratio_text}"
            )
        sections.append(("", lines))
    if "paired" in report:
        p = report["paired"]
        title = (
            f"{p['target']} paired with the ceiling: {len(p['pairs'])} alternated pairs at {p['level']},"
            f" ceiling at batch {p['batch']}, {_f(p['seconds'])} s each"
        )
        sections.append((title, paired_table(p)))
        sweep_ratio = next(t["ratio_to_ceiling"] for t in report["targets"] if t["label"] == p["target"])
        sections.append(
            (
                "",
                [
                    f"ratio at saturation, median of the pairs: {_ratio(p['ratio_to_ceiling'])} "
                    f"({_ratio(p['ratio_min'])}-{_ratio(p['ratio_max'])}); the sweep's: {_ratio(sweep_ratio)}"
                ],
            )
        )
    if "peers" in report and len(report["targets"]) > 1:
        sections.append(("Side by side", peers_table(report)))
    if "batching" in report:
        b = report["batching"]
        sections.append(
            (f"Batching on and off, {b['concurrency']} callers, {b['repeats']} repeats", batching_table(b))
        )
        sections.append(("", [f"speed-up from batching (medians): {b['gain']:.2f}x"]))
    if "accuracy" in report:
        sections.append(("Accuracy", accuracy_lines(report["accuracy"])))
    if "overhead" in report:
        o = report["overhead"]
        title = (
            f"Server CPU per request (ms), near-free model, {o['concurrency']} callers from "
            f"{o['load_processes']} load processes, median of the repeats"
        )
        sections.append((title, overhead_table(o["summary"])))
        if o["owner_alone"]:
            rows = [
                [
                    str(r["in_flight"]),
                    r["event_loop"],
                    _f(r["req_s"], 0),
                    _f(r["mean_batch"]),
                    _f(r["owner_total_ms"], 3),
                    *(_f(r["owner_ms"][k], 3) for k in ("event_loop", "instances", "runtime_pool")),
                    _f(r["owner_cap_req_s"], 0),
                ]
                for r in o["owner_alone"]
            ]
            header = ["in flight", "event loop", "req/s", "batch", "owner", "loop", "instances", "pool"]
            header.append("owner cap req/s")
            sections.append(
                ("The owner alone, fed by a stand-in front end (CPU ms per request)", (header, rows))
            )
    if "tune" in report:
        t = report["tune"]
        title = f"Candidates at p99 <= {t['p99_ms']:g} ms, in the order measured (the best level of each)"
        sections.append((title, tune_table(t)))
        sections.append(("The result", tune_lines(t)))
    return sections


def _preamble(report: dict[str, Any]) -> list[str]:
    lines = [
        f"machine: {report['machine']['description']}",
        f"started: {report['started']}",
        f"command: {report['command']}",
    ]
    if report["workload"]:
        w = report["workload"]
        lines.append(
            f"workload: {w['api']}, {w['input']}, {w['images_per_request']} image(s) per request, "
            f"{'one stream per load generator worker' if w['streaming'] else 'unary calls'}"
            + (f", {w['workers']} load generator process(es)" if "workers" in w else "")
        )
    if report["note"]:
        lines.append(f"note: {report['note']}")
    return lines


def terminal(report: dict[str, Any]) -> str:
    out = [f"hrnet bench {report['mode']}", *_preamble(report)]
    for title, body in _sections(report):
        out.append("")
        if title:
            out.append(title)
        out.append(_plain(body) if isinstance(body, tuple) else "\n".join(body))
    return "\n".join(out)


def markdown(report: dict[str, Any], plots: Sequence[str] = ()) -> str:
    out = [f"# hrnet bench {report['mode']}", ""]
    out += [f"- {line}" for line in _preamble(report)]
    for title, body in _sections(report):
        out.append("")
        if title:
            out += [f"## {title}", ""]
        out.append(_markdown_table(body) if isinstance(body, tuple) else "\n".join(f"{x}  " for x in body))
    if "accuracy" in report and report["accuracy"].get("differ"):
        out += ["", "### Images where the server and hrnet eval differ (top-1)", ""]
        out.append(
            _markdown_table(
                (
                    ["image", "label", "server", "hrnet eval"],
                    [
                        [d["image"], str(d["label"]), str(d["server"]), str(d["eval"])]
                        for d in report["accuracy"]["differ"]
                    ],
                )
            )
        )
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{name}]({name})" for name in plots]
    return "\n".join(out) + "\n"


# --- plots ------------------------------------------------------------------------------------


def write_plots(report: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    """Throughput and p99 against load, and the latency CDFs; batch-size curves for the ceiling."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    subtitle = report["machine"]["description"].split(", onnxruntime")[0]
    paths = []

    def save(fig: Any, name: str) -> None:
        fig.suptitle(subtitle, fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        path = folder / f"{stem}_{name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
        paths.append(path)

    if report["ceilings"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in report["ceilings"]:
            ax.plot(
                [b["batch"] for b in c["batches"]],
                [b["img_s"] for b in c["batches"]],
                "o-",
                label=Path(c["model"]).name,
            )
        ax.set(xlabel="batch size", ylabel="img/s", title="Ceiling: in-process throughput")
        _log2_axis(ax, [b["batch"] for c in report["ceilings"] for b in c["batches"]])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "batches")

    targets = [t for t in report["targets"] if t["levels"]]
    if targets and report["mode"] != "batching":  # batching repeats one level: nothing to draw against
        closed = any(lv["concurrency"] for t in targets for lv in t["levels"])
        x_key, x_label = ("concurrency", "concurrent callers") if closed else ("rate", "offered req/s")
        for key, title, name in (("img_s", "Throughput", "throughput"), ("p99_ms", "p99 latency", "p99")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for t in targets:
                points = [(lv[x_key], lv[key]) for lv in t["levels"] if lv[x_key] and lv[key] is not None]
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=t["label"])
            if key == "img_s" and report["ceilings"]:
                best = report["ceilings"][0]["best_img_s"]
                ax.axhline(best, ls="--", color="gray", label=f"ceiling {best:.1f} img/s")
            _log2_axis(ax, [lv[x_key] for t in targets for lv in t["levels"] if lv[x_key]])
            ax.set_ylim(bottom=0)
            ax.set(xlabel=x_label, ylabel="img/s" if key == "img_s" else "ms", title=title)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            save(fig, name)
    if targets:
        fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
        for ax, t in zip(axes[0], targets, strict=True):
            labels = [level_label(lv) for lv in t["levels"]]
            for run, (lv, label) in enumerate(zip(t["levels"], labels, strict=True), 1):
                if labels.count(label) > 1:  # batching repeats its level
                    label = f"{label}, run {run}"
                if lv["cdf_ms"]:
                    ax.plot([p[1] for p in lv["cdf_ms"]], [p[0] for p in lv["cdf_ms"]], label=label)
            ax.set(xscale="log", xlabel="latency ms", ylabel="percentile", title=f"Latency CDF: {t['label']}")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        save(fig, "latency_cdf")
    if "overhead" in report:
        summary = report["overhead"]["summary"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        payloads = list(dict.fromkeys(r["payload"] for r in summary))
        loops = list(dict.fromkeys(r["event_loop"] for r in summary))
        for payload, loop in dict.fromkeys((r["payload"], r["event_loop"]) for r in summary):
            mine = [r for r in summary if r["payload"] == payload and r["event_loop"] == loop]
            # colour: the payload; line: the loop (solid, dashed); o: owner cap, x: served
            style = {
                "color": f"C{payloads.index(payload)}",
                "linestyle": ("-", "--", ":")[loops.index(loop) % 3],
            }
            points = sorted((r["serve_workers"], r["owner_cap_req_s"] or 0) for r in mine)
            name = f"{payload}, {loop}"
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                label=f"{name}: owner cap",
                **style,
            )
            served = sorted((r["serve_workers"], r["req_s"]) for r in mine)
            ax.plot(
                [p[0] for p in served],
                [p[1] for p in served],
                marker="x",
                label=f"{name}: served",
                alpha=0.6,
                **style,
            )
        ax.set(xlabel="hrnet serve --workers", ylabel="requests/s", title="Owner cap (1000 / owner CPU ms)")
        ax.set_xticks(sorted({r["serve_workers"] for r in summary}))
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
        save(fig, "owner_cap")
    if "tune" in report:
        save(pareto_plot(plt, report["tune"]), "pareto")
    return paths


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (p99 ms, img/s) points no other point beats on both, by rising p99."""
    front: list[tuple[float, float]] = []
    for p99, img_s in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or img_s > front[-1][1]:
            front.append((p99, img_s))
    return front


def pareto_plot(plt: Any, tune: dict[str, Any]) -> Any:
    """Every level of every candidate: throughput against p99, the front, the target, both picks."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [
        (lv["p99_ms"], lv["img_s"])
        for m in tune["candidates"]
        for lv in m["levels"]
        if lv["p99_ms"] is not None and not lv["errors"]
    ]
    ax.scatter(
        [p[0] for p in points], [p[1] for p in points], s=12, color="lightgray", label="a level measured"
    )
    front = pareto_front(points)
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="tab:blue", ms=4, label="Pareto front")
    for key, colour, name in (
        (tune["default"], "tab:red", "defaults"),
        (tune["chosen"], "tab:green", "chosen"),
    ):
        m = next((m for m in tune["candidates"] if m["key"] == key), None)
        best = best_level(m["levels"], tune["p99_ms"]) if m else None
        if best:
            ax.scatter(
                [best["p99_ms"]], [best["img_s"]], s=60, color=colour, zorder=3, label=f"{name}: {key}"
            )
    ax.axvline(tune["p99_ms"], ls="--", color="gray", label=f"p99 target {tune['p99_ms']:g} ms")
    ax.set(xscale="log", xlabel="p99 latency, ms", ylabel="img/s", title="Tuning: throughput against p99")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _log2_axis(ax: Any, values: Sequence[float]) -> None:
    """A log2 axis labelled with the measured values themselves (1, 2, 4, ... not 2^0, 2^1)."""
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()
