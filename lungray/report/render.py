"""metrics.json -> report.md and a self-contained report.html, worded for a clinical reader.

The report is first built as a list of blocks (headings, paragraphs, tables, figures), then
written out twice, so the Markdown and the HTML cannot say different things. It opens with
the answer (which model is better, by how much, and how sure we are), then the details.
The HTML embeds every image as a data URI and its style inline: one file that can be
mailed or archived and opens anywhere without network access.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TITLE = "Chest X-ray screening: CNN vs CNN-LSTM"
NOT_RECORDED = "not recorded"

RATE_ROWS = (
    ("accuracy", "Accuracy"),
    ("precision", "Precision (positive predictive value)"),
    ("recall", "Recall (sensitivity)"),
    ("specificity", "Specificity"),
    ("f1", "F1"),
)
RANKING_ROWS = (("auroc", "AUROC"), ("auprc", "AUPRC (average precision)"))
OPERATING_POINT_ROWS = (
    ("sensitivity_at_specificity_0.80", "Sensitivity at specificity 80%"),
    ("sensitivity_at_specificity_0.90", "Sensitivity at specificity 90%"),
    ("specificity_at_sensitivity_0.90", "Specificity at sensitivity 90%"),
    ("specificity_at_sensitivity_0.95", "Specificity at sensitivity 95%"),
)
FIGURE_CAPTIONS = {
    "roc": "ROC curves: the closer to the top-left corner, the better a model ranks abnormal above normal images.",
    "pr": "Precision-recall curves: how many flagged images are truly abnormal at each sensitivity.",
    "confusion": "Confusion matrices at each model's stored threshold (rows: truth, columns: the model's call).",
    "reliability": "Reliability diagram: a calibrated model's points lie on the diagonal.",
    "training": "Training curves from each model's record (model.json).",
}

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { border-bottom: 2px solid #2b5d8a; padding-bottom: .2em; }
h2 { color: #2b5d8a; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #c8ced8; padding: .35em .6em; text-align: left; vertical-align: top; }
th { background: #eef2f7; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #dde2ea; }
figcaption { font-size: .9em; color: #4a5263; }
.gallery { display: flex; flex-wrap: wrap; gap: .8em; }
.gallery figure { width: 200px; margin: 0; }
.gallery img { width: 200px; image-rendering: pixelated; }
"""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str
    lead: str = ""  # shown in bold before the text


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the report folder
    caption: str


@dataclass(frozen=True)
class Gallery:
    """Small figures side by side (the Grad-CAM examples)."""

    figures: tuple[Figure, ...]


Block = Heading | Paragraph | Bullets | Table | Figure | Gallery


def write_report(results: dict[str, Any], directory: Path) -> None:
    """report.md and report.html in `directory`, which must already hold the figures."""
    blocks = report_blocks(results)
    (directory / "report.md").write_text(to_markdown(blocks))
    (directory / "report.html").write_text(to_html(blocks, directory))


def across_markdown(summary: dict[str, Any]) -> str:
    """summary.md of `run_compare_across`: each model on each data set, with CIs."""
    rows = tuple(
        (
            row["name"],
            row["data_set"],
            fmt_estimate(row["auroc"], fmt_auc),
            fmt_estimate(row["recall"], fmt_rate),
            fmt_estimate(row["specificity"], fmt_rate),
            "yes: in-sample" if row["fitted_on_this_data"] else "no",
        )
        for row in summary["rows"]
    )
    sizes = "; ".join(
        f"{name}: {data['split']} split of {data['path']}, {data['n_images']} images ({data['n_abnormal']} abnormal)"
        for name, data in summary["data_sets"].items()
    )
    return to_markdown([
        Heading("The models across data sets", level=1),
        Paragraph(f"Data sets: {sizes}. Each has its full report in the folder of its name."),
        Table(("model", "data set", "AUROC (95% CI)", "sensitivity at stored threshold", "specificity at stored threshold", "fitted on these images"), rows),
        Paragraph("A model fitted on a data set by calibrate or adapt is in-sample there; its cross-validated figures are in its report's Site adaptation section."),
    ])


def report_blocks(results: dict[str, Any]) -> list[Block]:
    """The whole report: answer, published vs ours, metrics, paired tests, sources, efficiency, figures, method."""
    models = results["models"]
    return [
        Heading(TITLE, level=1),
        Paragraph(data_statement(results)),
        Heading("The answer"),
        *answer_blocks(results),
        Heading("Beside the published design"),
        published_table(results),
        Paragraph(
            f"{results['published']['note']} Our figures are on this data set's patient-level {results['data']['split']} "
            "split at each model's stored threshold, so the two columns come from different test sets and the "
            "comparison is indicative only."
        ),
        Heading("Metrics at the stored threshold"),
        metrics_table(models),
        Paragraph(
            "Threshold-free rows (AUROC, AUPRC, and the sensitivity/specificity pairs) describe what each model could do "
            "at any operating point; the others use the threshold stored with the model. "
            f"Brackets hold {ci_phrase(results)}."
        ),
        Heading("Paired tests"),
        pairs_table(results) if results["pairs"] else Paragraph("Only one model was given: there is nothing to pair."),
        *source_blocks(results),
        *lineage_blocks(models),
        Heading("Efficiency"),
        efficiency_table(models),
        Paragraph(
            "Training figures come from each model's record (model.json); inference speed was measured here, "
            "timing the scoring of the whole split after one untimed warm-up batch."
        ),
        Heading("Figures"),
        *figure_blocks(results),
        Heading("Where the models look (Grad-CAM)"),
        Paragraph(
            "Grad-CAM heat maps of the evidence for \"abnormal\" on the last convolutional block, shown for each model's "
            "most confident true positives, highest-scored false positives and lowest-scored false negatives. "
            "Heat on the lung fields is reassuring; heat on labels, borders or devices suggests a shortcut."
        ),
        *gradcam_blocks(models),
        Heading("Method"),
        Bullets(method_notes(results)),
    ]


def data_statement(results: dict[str, Any]) -> str:
    data = results["data"]
    sources = ", ".join(f"{source} {count}" for source, count in data["images_by_source"].items())
    return (
        f"Data: the {data['split']} split of {data['path']} (data fingerprint {data['fingerprint'][:12]}): "
        f"{data['n_images']} images from {data['n_patients']} patients, {data['n_abnormal']} abnormal and "
        f"{data['n_normal']} normal (images by source: {sources}). Intervals are {ci_phrase(results)}."
    )


def ci_phrase(results: dict[str, Any]) -> str:
    ci = results["ci"]
    return f"{ci['level']:.0%} confidence intervals by {ci['method']} ({ci['resamples']} resamples)"


def answer_blocks(results: dict[str, Any]) -> list[Block]:
    """One paragraph per pair of models: ranking (AUROC) first, then the calls at the stored thresholds."""
    models = {entry["model_id"]: entry for entry in results["models"]}
    if not results["pairs"]:
        (only,) = models.values()
        return [Paragraph(f"Only {only['name']} was given. {threshold_sentence(only)}")]
    blocks: list[Block] = [Paragraph(pair_verdict(pair, models), lead=pair_title(pair, models)) for pair in results["pairs"]]
    if len(results["pairs"]) > 1:
        blocks.append(Paragraph("With several pairs, p-values are not corrected for multiple comparisons."))
    return blocks


def pair_title(pair: dict[str, Any], models: dict[str, dict[str, Any]]) -> str:
    better, other, _ = oriented(pair, models)
    return f"{better['name']} vs {other['name']}."


def oriented(pair: dict[str, Any], models: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(higher-AUROC model, the other, +1 if that is model_a else -1): say "A is higher by d", not "by -d"."""
    a, b = models[pair["model_a"]], models[pair["model_b"]]
    return (a, b, 1) if pair["paired_bootstrap_auroc"]["difference"] >= 0 else (b, a, -1)


def pair_verdict(pair: dict[str, Any], models: dict[str, dict[str, Any]]) -> str:
    better, other, sign = oriented(pair, models)
    bootstrap, delong, test = pair["paired_bootstrap_auroc"], pair["delong"], pair["mcnemar"]
    low, high = (None, None) if bootstrap["ci_low"] is None else sorted((sign * bootstrap["ci_low"], sign * bootstrap["ci_high"]))
    gap = "equal" if bootstrap["difference"] == 0 else f"{better['name']} higher by {fmt_auc(abs(bootstrap['difference']))}"
    ranking = (
        f"AUROC {fmt_auc(better['metrics']['auroc']['value'])} vs {fmt_auc(other['metrics']['auroc']['value'])}: {gap} "
        f"(95% CI {fmt_signed(low)} to {fmt_signed(high)}, patient-level paired bootstrap p = {fmt_p(bootstrap['p_value'])}; "
        f"DeLong p = {fmt_p(delong['p_value'])})."
    )
    if low is not None and low > 0:
        certainty = f"The interval excludes 0: {better['name']} ranks abnormal above normal images better on this data."
    else:
        certainty = "The interval includes 0: on this data the two models cannot be told apart by AUROC."
    right_better, right_other = (test["b"], test["c"]) if sign > 0 else (test["c"], test["b"])
    calls = (
        f"At the stored thresholds, accuracy {fmt_rate(better['metrics']['accuracy']['value'])} vs "
        f"{fmt_rate(other['metrics']['accuracy']['value'])}; {better['name']} is right where {other['name']} is wrong on "
        f"{right_better} images, the reverse on {right_other} (McNemar p = {fmt_p(test['p_value'])}). "
        f"{threshold_sentence(better)} {threshold_sentence(other)}"
    )
    return f"{ranking} {certainty} {calls}"


def threshold_sentence(model: dict[str, Any]) -> str:
    metrics = model["metrics"]
    return (
        f"{model['name']} at its threshold {model['threshold']:.4g}: sensitivity {fmt_estimate(metrics['recall'], fmt_rate)}, "
        f"specificity {fmt_estimate(metrics['specificity'], fmt_rate)}."
    )


def published_table(results: dict[str, Any]) -> Table:
    published = results["published"]["accuracy"]
    rows = tuple(
        (
            model["name"],
            fmt_rate(published[model["arch"]]) if model["arch"] in published else "not published",
            fmt_estimate(model["metrics"]["accuracy"], fmt_rate),
            fmt_estimate(model["metrics"]["auroc"], fmt_auc),
        )
        for model in results["models"]
    )
    return Table(("model", "design: accuracy (published)", "ours: accuracy (95% CI)", "ours: AUROC (95% CI)"), rows)


def metrics_table(models: Sequence[dict[str, Any]]) -> Table:
    rows: list[tuple[str, ...]] = [("Stored threshold", *(f"{model['threshold']:.4g}" for model in models))]
    rows += [(label, *(fmt_estimate(model["metrics"][key], fmt_rate) for model in models)) for key, label in RATE_ROWS]
    rows += [(label, *(fmt_estimate(model["metrics"][key], fmt_auc) for model in models)) for key, label in RANKING_ROWS]
    rows += [(label, *(fmt_estimate(model["operating_points"][key], fmt_rate) for model in models)) for key, label in OPERATING_POINT_ROWS]
    rows += [
        ("True / false positives", *(f"{m['confusion_matrix'][1][1]} / {m['confusion_matrix'][0][1]}" for m in models)),
        ("True / false negatives", *(f"{m['confusion_matrix'][0][0]} / {m['confusion_matrix'][1][0]}" for m in models)),
        ("Calibration error (ECE) / Brier score", *(f"{m['calibration']['ece']:.3f} / {m['calibration']['brier']:.3f}" for m in models)),
    ]
    return Table(("", *(model["name"] for model in models)), tuple(rows))


def pairs_table(results: dict[str, Any]) -> Table:
    names = {model["model_id"]: model["name"] for model in results["models"]}
    rows = []
    for pair in results["pairs"]:
        test, delong, bootstrap = pair["mcnemar"], pair["delong"], pair["paired_bootstrap_auroc"]
        rows.append(
            (
                f"{names[pair['model_a']]} - {names[pair['model_b']]}",
                f"{test['b']} / {test['c']}, p = {fmt_p(test['p_value'])} ({test['method']})",
                f"{fmt_signed(delong['difference'])} ({fmt_signed(delong['ci_low'])} to {fmt_signed(delong['ci_high'])}), p = {fmt_p(delong['p_value'])}",
                f"{fmt_signed(bootstrap['difference'])} ({fmt_signed(bootstrap['ci_low'])} to {fmt_signed(bootstrap['ci_high'])}), p = {fmt_p(bootstrap['p_value'])}",
            )
        )
    return Table(
        (
            "A - B",
            "McNemar: images only A / only B gets right",
            "DeLong: AUROC difference (95% CI)",
            "patient bootstrap: AUROC difference (95% CI)",
        ),
        tuple(rows),
    )


def source_blocks(results: dict[str, Any]) -> list[Block]:
    """Per-source rows and the cross-dataset table, when the split merges two or more sources."""
    by_source = results["by_source"]
    if not by_source:
        return []
    models = results["models"]
    per_source_rows = tuple(
        (
            source,
            f"{part['n_images']} / {part['n_patients']} / {part['n_abnormal']}",
            model["name"],
            *(fmt_estimate(part["metrics"][model["model_id"]][key], fmt_rate) for key in ("accuracy", "recall", "specificity")),
            fmt_estimate(part["metrics"][model["model_id"]]["auroc"], fmt_auc),
        )
        for source, part in by_source.items()
        for model in models
    )
    cross_rows = []
    for model in models:
        trained_on = model["training_sources"]["sources"]
        cells = []
        for source, part in by_source.items():
            cell = fmt_estimate(part["metrics"][model["model_id"]]["auroc"], fmt_auc)
            if trained_on is not None:
                cell += " (in-domain)" if source in trained_on else " (external)"
            cells.append(cell)
        cross_rows.append((model["name"], " + ".join(trained_on) if trained_on else "unknown", *cells))
    unknown = [f"{model['name']}: {model['training_sources']['basis']}." for model in models if model["training_sources"]["sources"] is None]
    return [
        Heading("By source"),
        Table(("source", "images / patients / abnormal", "model", "accuracy", "sensitivity", "specificity", "AUROC"), per_source_rows),
        Heading("Across data sets"),
        Paragraph(
            "AUROC of each model on each source of this split, marked in-domain where the model was trained on that "
            "source and external where it was not. A full train-on-one, test-on-each grid needs one model trained per source."
        ),
        Table(("model", "trained on", *(f"AUROC on {source}" for source in by_source)), tuple(cross_rows)),
        *([Paragraph(" ".join(unknown), lead="Training source not known.")] if unknown else []),
    ]


def lineage_blocks(models: Sequence[dict[str, Any]]) -> list[Block]:
    """Which models were derived for a site (calibrate / adapt), from what, and whether on these images."""
    lines = []
    for model in models:
        for step in model.get("lineage") or []:
            labels = "with its labels" if step["labels_used"] else "without labels"
            line = f"{model['name']}: {step['step']} for site {step['site']} on {step['n_images']} images {labels}, from {step['parent_model_id']}."
            if step["fitted_on_this_data"]:
                line += " Fitted on this report's data: its figures here are in-sample for this step."
            if step["cross_validation"]:
                cv = step["cross_validation"]
                line += (
                    f" Cross-validated over the site's patients ({cv['folds']} folds): sensitivity "
                    f"{fmt_estimate(cv['recall'], fmt_rate)}, specificity {fmt_estimate(cv['specificity'], fmt_rate)}."
                )
            for warning in step.get("warnings") or []:
                line += f" Warning when fitted: {warning}"
            lines.append(line)
    return [Heading("Site adaptation"), Bullets(tuple(lines))] if lines else []


def threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def training_time(wall: float | None, hardware: dict[str, Any] | None) -> str:
    """"12.5 min (2 x NVIDIA H200, nccl)": a training time says little without where it ran."""
    if wall is None:
        return NOT_RECORDED
    if not hardware:
        return f"{wall / 60:.1f} min"
    where = [f"{hardware['workers']} x {hardware['device']}"]
    if hardware["device"] == "CPU":
        where.append(f"{threads(hardware['threads_per_worker'])} each")
    if hardware.get("backend"):
        where.append(hardware["backend"])
    return f"{wall / 60:.1f} min ({', '.join(where)})"


def epoch_note(best: int | None, selected: int | None) -> str:
    """" (best 8, exported 12)": which epoch validated best and which one's weights the model holds.

    model.json counts epochs from 0; the report counts them from 1, as the training log and
    the epoch total beside the note do ("15 (best 15)" when the last of 15 was the best).
    """
    if best is None:
        return ""
    return f" (best {best + 1})" if selected in (None, best) else f" (best {best + 1}, exported {selected + 1})"


def efficiency_table(models: Sequence[dict[str, Any]]) -> Table:
    rows = []
    for model in models:
        efficiency = model["efficiency"]
        wall, epochs, best = efficiency["training_wall_time_s"], efficiency["epochs_trained"], efficiency["best_epoch"]
        memory = efficiency["peak_training_memory_mb"]
        rows.append(
            (
                model["name"],
                f"{efficiency['n_parameters']:,}",
                training_time(wall, efficiency.get("training_hardware")),
                NOT_RECORDED if epochs is None else f"{epochs}" + epoch_note(best, efficiency.get("selected_epoch")),
                NOT_RECORDED if memory is None else f"{memory:,.0f} MB",
                f"{efficiency['inference_images_per_s']:.1f} ({efficiency['inference_device']}, "
                f"{threads(efficiency['inference_torch_threads'])}, batch {efficiency['inference_batch_size']})",
            )
        )
    return Table(
        ("model", "parameters", "training wall time", "epochs (best)", "peak training memory", "inference images/s"),
        tuple(rows),
    )


def figure_blocks(results: dict[str, Any]) -> list[Block]:
    figures = results["figures"]
    blocks: list[Block] = [Figure(figures[key], FIGURE_CAPTIONS[key]) for key in FIGURE_CAPTIONS if key in figures]
    if "training" not in figures:
        blocks.append(Paragraph("No training curves: no model.json here records a per-epoch history."))
    return blocks


def gradcam_blocks(models: Sequence[dict[str, Any]]) -> list[Block]:
    """Per model, one row of overlays per kind of case; p is the model's probability of abnormal."""
    if not any(model["gradcam"] for model in models):
        return [Paragraph("None drawn: the report was made with --gradcam-examples 0.")]
    blocks: list[Block] = []
    for model in models:
        blocks.append(Heading(model["name"], level=3))
        for kind, examples in model["gradcam"].items():
            blocks.append(Paragraph("" if examples else "none in this split.", lead=f"{kind.capitalize()}s:"))
            if examples:
                blocks.append(Gallery(tuple(Figure(e["file"], f"{kind}, p = {e['prob']:.3g}") for e in examples)))
    return blocks


def method_notes(results: dict[str, Any]) -> tuple[str, ...]:
    ci = results["ci"]
    return (
        f"Confidence intervals: {ci['level']:.0%} {ci['method']}, {ci['resamples']} resamples, seed {ci['seed']}. "
        "Images of one patient are correlated, so resampling single images would give intervals that are too narrow.",
        *(threshold_note(model) for model in results["models"]),
        "McNemar's test compares the two models' calls image by image (exact binomial below 25 discordant images, "
        "else chi-square with continuity correction). DeLong's test compares AUROCs treating images as independent; "
        "the patient-level paired bootstrap does not, and is the one the answer above relies on.",
        "Sensitivity at a fixed specificity (and the reverse) is read off the empirical ROC curve, without interpolation.",
        "Calibration: 10 equal-width probability bins; ECE is the count-weighted mean gap between predicted and observed.",
        "Every number is in metrics.json, and every score they come from is in predictions.parquet.",
    )


def threshold_note(model: dict[str, Any]) -> str:
    """How the stored threshold was chosen, as model.json records it."""
    policy = model["threshold_policy"]
    if not policy:
        return f"Threshold of {model['name']}: {model['threshold']:.4g}; model.json does not record how it was chosen."
    details = "; ".join(f"{key.replace('_', ' ')} {value}" for key, value in policy.items() if key != "chosen_on")
    return f"Threshold of {model['name']}: {model['threshold']:.4g}, chosen on {chosen_on(policy.get('chosen_on'))} ({details})."


def chosen_on(where: str | None) -> str:
    """"the val split", or "site B's sample (held-out patients)" for a site step's `site:B ...`."""
    if where is None:
        return "an unrecorded split"
    site, sep, rest = where.partition(":")
    if site != "site" or not sep:
        return f"the {where} split"
    name, _, detail = rest.partition(" ")
    return f"site {name}'s sample" + (f" {detail}" if detail else "")


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def fmt_auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def fmt_signed(value: float | None) -> str:
    """"+0.012"; a bound that rounds to zero reads "+0.000", never "-0.000"."""
    return "n/a" if value is None else f"{round(value, 3) + 0.0:+.3f}"


def fmt_p(value: float | None, alpha: float = 0.05) -> str:
    """Three decimals, or "< 0.05" where three would round a p-value below `alpha` up to it
    (0.04995 is not "0.050" beside a verdict that the interval excludes 0)."""
    if value is None:
        return "n/a"
    if value < 0.001:
        return "< 0.001"
    text = f"{value:.3f}"
    return f"< {alpha:g}" if value < alpha <= float(text) else text


def fmt_estimate(estimate: dict[str, float | None], fmt: Any) -> str:
    """"value (low–high)"; the interval reads "CI n/a" when no resample could estimate it."""
    if estimate["value"] is None:
        return "n/a"
    if estimate["ci_low"] is None or estimate["ci_high"] is None:
        return f"{fmt(estimate['value'])} (CI n/a)"
    return f"{fmt(estimate['value'])} ({fmt(estimate['ci_low'])}–{fmt(estimate['ci_high'])})"


def to_markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        match block:
            case Heading(text, level):
                lines += ["#" * level + " " + _md(text), ""]
            case Paragraph(text, lead):
                lines += [" ".join(part for part in (f"**{_md(lead)}**" if lead else "", _md(text)) if part), ""]
            case Bullets(items):
                lines += [f"- {_md(item)}" for item in items] + [""]
            case Table(header, rows):
                lines.append("| " + " | ".join(_md_cell(cell) for cell in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in rows]
                lines.append("")
            case Figure(path, caption):
                lines += [f"![{_md(caption)}]({path})", "", f"*{_md(caption)}*", ""]
            case Gallery(figures):
                lines.append(" ".join(f"![{_md(figure.caption)}]({figure.path})" for figure in figures))
                lines += ["", "*" + "; ".join(f"{index}: {_md(figure.caption)}" for index, figure in enumerate(figures, 1)) + "*", ""]
    return "\n".join(lines)


def to_html(blocks: Sequence[Block], directory: Path) -> str:
    """One HTML file: inline style, every figure read from `directory` and embedded as a data URI."""
    body: list[str] = []
    for block in blocks:
        match block:
            case Heading(text, level):
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Paragraph(text, lead):
                strong = f"<strong>{html.escape(lead)}</strong>" if lead else ""
                body.append(f"<p>{' '.join(part for part in (strong, html.escape(text)) if part)}</p>")
            case Bullets(items):
                body.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>")
            case Table(header, rows):
                head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
                cells = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            case Figure():
                body.append(_html_figure(block, directory))
            case Gallery(figures):
                body.append('<div class="gallery">' + "".join(_html_figure(figure, directory) for figure in figures) + "</div>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(TITLE)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _html_figure(figure: Figure, directory: Path) -> str:
    encoded = base64.b64encode((directory / figure.path).read_bytes()).decode("ascii")
    caption = html.escape(figure.caption)
    return f'<figure><img src="data:image/png;base64,{encoded}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def _md(text: str) -> str:
    """`text` with what could open an HTML tag escaped: names (a site's, a model's) reach the
    markdown, and renderers pass raw HTML through; "p < 0.05" stays as it is."""
    return re.sub(r"<(?=[A-Za-z/!?])", r"\\<", text)


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|")
