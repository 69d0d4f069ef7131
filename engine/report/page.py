"""The report as one HTML file: charts as SVG and thumbnails as JPEG, both inlined as data URIs
(each SVG keeps its own ids that way), no script, nothing fetched. Written whole (a temporary
name and a rename, or one PUT) as OUT/report.html, only over a report bricks-dj wrote: its
files carry the generator meta tag below."""

from __future__ import annotations

import base64
import html
import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..store import OutputError, Store, store_errors
from . import charts, gather
from .gather import ReportError
from .thumbs import thumbnails
from .tokens import DEFAULT_MAX_LENGTH, count_tokens
from .trainer_view import TrainerView, TrainerViewError, trainer_view

log = logging.getLogger("bricks")

REPORT = "report.html"
MARKER = '<meta name="generator" content="bricks-dj report">'
KEPT_SHOWN = 8
NEAR = 3  # kept and dropped samples shown either side of each threshold


@dataclass
class ReportOptions:
    train_config: str | None = None  # a shipped config's name or a path
    world_size: int = 1
    samples_per_second: float | None = None
    t5: str | None = None  # tokenizer: a folder, a repo id in the HF cache, or "tiny"; default: the config's, else DeepFloyd's


def write_report(out: str | Store, options: ReportOptions | None = None,
                 manifest: dict[str, Any] | None = None) -> str:
    """Write OUT/report.html; returns where it is. Raises `ReportError` (one line)."""
    options = options or ReportOptions()
    data = gather.read_output(out, manifest)
    store = data.store
    try:
        with store_errors(store):
            _refuse_foreign(store)
            view = None
            if options.train_config:
                try:
                    view = trainer_view(store.show("shards") if not store.local else store.path("shards"),
                                        options.train_config, options.world_size, options.samples_per_second)
                except TrainerViewError as exc:
                    raise ReportError(str(exc)) from None
            store.write(REPORT, render(data, options, view))
    except OutputError as exc:
        raise ReportError(str(exc)) from None
    return store.show(REPORT)


def write_report_of(data: gather.OutputData, name: str, options: ReportOptions | None = None) -> str:
    """`data` (e.g. `gather.from_rows`) as the report NAME in its store; returns where it is."""
    store = data.store
    try:
        with store_errors(store):
            _refuse_foreign(store, name)
            store.write(name, render(data, options or ReportOptions()))
    except OutputError as exc:
        raise ReportError(str(exc)) from None
    return store.show(name)


def report_is_ours(store: Store, name: str = REPORT) -> bool | None:
    """True when the report NAME is one bricks-dj wrote, False when it is someone else's, None
    when there is none."""
    if not store.isfile(name):
        return None
    with store.fs.open(store.path(name), "rb") as f:
        return MARKER in f.read(4096).decode("utf-8", "replace")


def _refuse_foreign(store: Store, name: str = REPORT) -> None:
    if report_is_ours(store, name) is False:
        raise ReportError(f"{store.show(name)} was not written by bricks-dj: left as it is, no report written")


# -- the page -----------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top;font-size:.9em}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:1em}.chart{max-width:100%;height:auto}
.thumbs{display:flex;flex-wrap:wrap;gap:.8em}figure{margin:0;max-width:420px}figure img{max-width:100%;height:auto}
figcaption{font-size:.8em;color:#444;word-break:break-word}.missing{color:#9b2226}
.note{background:#fff4e5;border-left:4px solid #f4a261;padding:.4em .8em;margin:.4em 0}
.kept{color:#2a9d8f}.dropped{color:#e76f51}
"""


def render(data: gather.OutputData, options: ReportOptions, view: TrainerView | None = None) -> str:
    m = data.manifest
    notes = list(data.notes)
    parts = [_summary(m)]
    steps = gather.funnel(data)
    parts.append(_funnel(steps))
    picks, sections = _score_sections(data)
    kept_sample = gather.spread_sample(data, KEPT_SHOWN)
    thumbs = thumbnails(data.store, kept_sample + picks)
    parts += [s(thumbs) for s in sections]
    parts.append(_thumb_block("Kept samples", kept_sample, thumbs, None))
    tokens = _tokens(data, options, view)
    if tokens.missing:
        notes.append(f"caption lengths in T5 tokens ({tokens.tokenizer}) not shown: {tokens.missing}")
    parts.append(_distributions(data, tokens))
    if view is not None:
        parts.append(_trainer(view))
    else:
        parts.append("<h2>Trainer's view</h2><p>Give <code>bricks-dj report OUT --train-config NAME</code> to see how "
                     "a training config buckets these samples.</p>")
    title = f"bricks-dj report: {m['recipe'].get('name') or data.store.uri}"
    note_html = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{MARKER}'
            f'<meta name="viewport" content="width=device-width"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>{note_html}{''.join(parts)}"
            f"<p><small>Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} from "
            f"{_e(data.store.uri)}</small></p></body></html>\n")


def _summary(m: dict[str, Any]) -> str:
    s, samples, rejects = m["sources"], m["samples"], m["rejects"]
    return (f"<p><b>{samples['total']}</b> samples kept ({samples['video']} clips, {samples['image']} images) from "
            f"<b>{s['done']}</b> of {s['total']} sources ({s['kept']} kept, {s['dropped']} dropped, {s['failed']} "
            f"failed); {rejects['dropped']} samples or sources dropped and {rejects['failed']} failed. "
            f"Run finished {_e(m.get('finished_at', '?'))} in {m.get('elapsed_seconds', 0):.1f} s, "
            f"{len(m.get('shards', []))} shards.</p>")


def _funnel(steps: list[dict[str, Any]]) -> str:
    rows = []
    for s in steps:
        reasons = "<br>".join(f'<span class="{"dropped" if st == "dropped" else "missing"}">{st}</span> {n} × {_e(t)}'
                              for st, t, n in s["reasons"][:8])
        more = len(s["reasons"]) - 8
        if more > 0:
            reasons += f"<br>… and {more} more reasons"
        rows.append(f"<tr><td>{_e(s['label'])}</td>{_n(s['in'])}{_n(s['out'])}{_n(s['dropped'])}{_n(s['failed'])}"
                    f"<td>{reasons or '-'}</td></tr>")
    return ("<h2>Funnel</h2><p>Sources, then samples, in and out of each operator (the manifest's counts), with the "
            f"reasons of its drops and failures (numbers taken out).</p>{_img(charts.funnel(steps), 'funnel')}"
            "<table><tr><th>operator</th><th>in</th><th>out</th><th>dropped</th><th>failed</th><th>reasons</th></tr>"
            f"{''.join(rows)}</table>")


def _score_sections(data: gather.OutputData):
    """The rows whose thumbnails the score sections need, and the sections (given the thumbnails)."""
    picks, sections = [], []
    if not data.score_columns:
        return picks, [lambda thumbs: "<h2>Scores</h2><p>This output has no score columns.</p>"]
    sections.append(lambda thumbs: "<h2>Scores</h2><p>Kept samples, samples the column's own filter dropped, and "
                                   "samples later operators dropped (scored before their decision).</p>")
    for column in data.score_columns:
        ts = [t for t in data.thresholds if t.column == column]
        values = gather.score_values(data, column)
        chart = charts.score_histogram(column, values, [(t.param, t.value) for t in ts])
        near = [(t, gather.near_threshold(data, t, NEAR)) for t in ts]
        for _, found in near:
            picks += [*found["kept"], *found["dropped"]]

        def section(thumbs, column=column, chart=chart, near=near):
            blocks = "".join(_thumb_block(f"Near {t.op_label} {t.param} {t.value:g}: {side}", found[side], thumbs,
                                          column) for t, found in near for side in ("kept", "dropped"))
            return f"<h3>{_e(column)}</h3>{_img(chart, f'{column} histogram')}{blocks}"

        sections.append(section)
    return picks, sections


def _thumb_block(title: str, rows: list[dict[str, Any]], thumbs: dict[str, bytes | str], column: str | None) -> str:
    if not rows:
        return f"<h4>{_e(title)}</h4><p>none</p>"
    figures = []
    for row in rows:
        made = thumbs.get(row["sample_id"], "no thumbnail")
        picture = (_img(made, f"sample {row['sample_id']}", "jpeg", "thumb") if isinstance(made, bytes)
                   else f'<p class="missing">no frames: {_e(made)}</p>')
        figures.append(f"<figure>{picture}<figcaption>{_caption(row, column)}</figcaption></figure>")
    return f"<h4>{_e(title)}</h4><div class='thumbs'>{''.join(figures)}</div>"


def _caption(row: dict[str, Any], column: str | None) -> str:
    bits = [f"<code>{_e(row['sample_id'])}</code> {_e(row.get('kind'))}"]
    if row.get("start_frame") is not None:
        bits.append(f"frames {row['start_frame']}–{row.get('end_frame')} of {_e(_base(row.get('source_uri')))}")
    if column is not None and "score" in row:
        bits.append(f"<b>{_e(column)} {row['score']:.4g}</b>")
    scores = {k: v for k, v in (row.get("_scores") or {}).items() if isinstance(v, (int, float))}
    scores.update({k: row[k] for k in row if k.startswith(("flow", "aes", "dj_")) and isinstance(row[k], (int, float))})
    if scores:
        bits.append(", ".join(f"{_e(k)} {v:.4g}" for k, v in sorted(scores.items())))
    if row.get("reason"):
        bits.append(f'<span class="dropped">{_e(row["reason"])}</span>')
    if row.get("text"):
        bits.append(f"“{_e(row['text'])}”")
    return "<br>".join(bits)


def _base(uri: str | None) -> str:
    return (uri or "?").rstrip("/").rsplit("/", 1)[-1]


def _tokens(data: gather.OutputData, options: ReportOptions, view: TrainerView | None):
    texts = [t for t in data.kept.get("text") if t]
    ref = options.t5 or (view.text_encoder if view else None)
    return count_tokens(texts, ref, view.max_length if view else DEFAULT_MAX_LENGTH)


def _distributions(data: gather.OutputData, tokens) -> str:
    d = gather.distributions(data)
    blocks = [_img(charts.histogram(d["duration"], "clip duration (s)"), "duration"),
              _img(charts.histogram(d["fps"], "fps (clips)"), "fps"),
              _img(charts.histogram(d["aspect_ratio"], "aspect ratio (height / width)"), "aspect ratio"),
              _img(charts.bars(Counter(d["size"]), "samples per resolution (width x height)"), "resolution")]
    texts = [t for t in data.kept.get("text") if t]
    if not texts:
        token_line = "<p>No kept sample has a caption.</p>"
    elif tokens.missing:
        token_line = f'<p class="missing">Caption lengths in T5 tokens not shown: {_e(tokens.missing)}</p>'
    else:
        blocks.append(_img(charts.histogram(tokens.lengths, f"caption length in T5 tokens ({tokens.tokenizer})",
                                            ("model_max_length", tokens.max_length)), "caption tokens"))
        token_line = (f"<p>{tokens.cut} of {len(tokens.lengths)} captions exceed model_max_length "
                      f"{tokens.max_length} tokens and would be cut by the trainer.</p>")
    return f"<h2>Kept samples: distributions</h2><div class='charts'>{''.join(blocks)}</div>{token_line}"


def _trainer(view: TrainerView) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td>{_n(n)}{_n(b)}</tr>" for k, (n, b) in view.buckets.items())
    hours = (f"<p>At {view.samples_per_second:g} samples/s over {view.world_size} GPUs: "
             f"<b>{view.gpu_hours:.3g} GPU-hours per epoch</b>.</p>" if view.gpu_hours is not None else
             "<p>Give <code>--samples-per-second</code> (as bricks-train logs it) for GPU-hours per epoch.</p>")
    chart = _img(charts.bars({k: n for k, (n, _) in view.buckets.items()}, "samples per bucket", top=30), "buckets")
    return (f"<h2>Trainer's view: {_e(view.config)}</h2><p>{view.samples} samples in the shards, {view.usable} "
            f"usable (captioned, with media); <b>{view.bucketed}</b> fall into buckets, <b>{view.unfit}</b> fit none "
            f"({_e(view.unfit_reason)}). <b>{view.steps_per_epoch}</b> steps per epoch at world size "
            f"{view.world_size}.</p>{hours}{chart}<table><tr><th>bucket</th><th>samples</th><th>batch size</th></tr>"
            f"{rows}</table>")


def _img(data: bytes, alt: str, kind: str = "svg+xml", cls: str = "chart") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/{kind};base64,{base64.b64encode(data).decode()}">'


def _n(value: Any) -> str:
    return f'<td class="n">{"-" if value is None else value}</td>'


def _e(value: Any) -> str:
    return html.escape(str(value) if not isinstance(value, (dict, list)) else json.dumps(value))
