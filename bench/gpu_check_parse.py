"""Parsers of the gpu-check stages' output (bench/gpu_check.py): each takes the stage's text,
its exit code and whether it was a dry run, and returns (status or None to keep the exit
code's, figures dict, note). Imports only the standard library.
"""
import json
import math
import re

MIN_ACCURACY = 98.0  # % test accuracy after one epoch of `minires train --device cuda`


def parse_pytest(text, rc, dry):
    counts = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                           line)
        if found:
            counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
            break
    figures = {k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error")}
    if rc == 5 or (rc == 0 and not figures["passed"]):
        return "skip", figures, "no test ran (all skipped or none selected): no GPU here?"
    return None, figures, ""


def parse_gradcheck(text, rc, dry):
    m = re.search(r"(\d+) of (\d+) checks passed \((\d+) cases", text)
    figures = {"checks passed": int(m.group(1)), "checks": int(m.group(2)),
               "cases": int(m.group(3))} if m else {}
    return None, figures, "" if m else "no 'N of M checks passed (K cases, ...)' line"


def parse_train(text, rc, dry):
    m = re.search(r"test accuracy ([\d.]+)% \(loss ([\d.naif]+)\) after (\d+) steps \| "
                  r"training ([\d.]+) s \((\d+) img/s\)", text)
    if not m:
        return ("fail" if rc == 0 else None), {}, "no 'test accuracy' line in the output"
    acc = float(m.group(1))
    figures = {"test accuracy %": acc, "test loss": _num(m.group(2)), "steps": int(m.group(3)),
               "training s": float(m.group(4)), "images/s": int(m.group(5))}
    wall = re.search(r"wall time ([\d.]+) s", text)
    if wall:
        figures["wall s"] = float(wall.group(1))
    if dry or rc != 0:
        return None, figures, "dry run: 256 images, accuracy not checked" if dry else ""
    if acc < MIN_ACCURACY:
        return "fail", figures, f"test accuracy {acc:.2f}% < {MIN_ACCURACY:.0f}%"
    return None, figures, f"test accuracy {acc:.2f}% >= {MIN_ACCURACY:.0f}%"


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def parse_kernels(text, rc, dry):
    objs = json_lines(text)
    rows = [o for o in objs if o.get("table") == "kernels"]
    header = next((o["header"] for o in objs if "header" in o), {})
    if not rows:
        return ("fail" if rc == 0 else None), {}, "no kernel rows in the output"
    ratios = [r["f+b/torch x"] for r in rows if r.get("f+b/torch x")]
    figures = {"rows": len(rows), "kernels": header.get("kernels"),
               "torch": header.get("torch")}
    if ratios:
        worst = max(rows, key=lambda r: r.get("f+b/torch x") or 0)
        figures.update({"f+b/torch x, geometric mean": round(_gmean(ratios), 3),
                        "f+b/torch x, worst": f"{worst['f+b/torch x']:.2f} ({worst['kernel']} "
                        f"{worst['shape']})"})
    figures["table"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                         if k != "table"} for r in rows]
    return None, figures, "" if ratios else "no PyTorch column (torch missing or without CUDA)"


def parse_launches(text, rc, dry):
    objs = [o for o in json_lines(text) if o.get("command") == "launches"]
    if not objs:
        return ("fail" if rc == 0 else None), {}, "no launches report in the output"
    rows = {r["optimizer"]: r for r in objs[-1]["rows"]}
    figures = {"mode": objs[-1]["mode"]}
    for name, r in rows.items():
        figures[f"launches/step ({name} SGD)"] = r["launches_per_step"]
        figures[f"minires numba.cuda launches ({name} SGD)"] = r["minires_launches"]
    figures["how counted"] = objs[-1]["rows"][0]["how"]
    figures["minires kernels"] = objs[-1]["rows"][0]["minires_kernels"]
    return None, figures, ""


def parse_epoch(text, rc, dry):
    objs = [o for o in json_lines(text) if o.get("command") == "epoch"]
    if not objs:
        return ("fail" if rc == 0 else None), {}, "no epoch report in the output"
    r = objs[-1]
    figures = {"steps": r.get("steps"), "batch": r.get("batch")}
    for side in ("minires", "torch"):
        b = (r.get("best") or {}).get(side)
        if b:
            figures[f"{side} training s"] = b.get("train_s")
            figures[f"{side} ms/step"] = b.get("ms_per_step")
            figures[f"{side} test accuracy %"] = round(100 * b["test_accuracy"], 2) \
                if b.get("test_accuracy") is not None else None
    figures["minires/torch x"] = r.get("ratio")
    return None, figures, r.get("ratio_note") or ""


def _num(s):
    try:
        return float(s)
    except ValueError:
        return s


def _gmean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))
