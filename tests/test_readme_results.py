"""README.md's "Results on the development data" quotes the latest clean-checkout numbers of
docs/RESULTS.md (the lab notebook): the round it names is the last round with a "Checks and
clean-checkout numbers" section, and the defect AP in its table are that section's."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the README's 3 decimals of a 4-decimal AP (0.9595 may be 0.95945, written 0.959)
AP_TOLERANCE = 0.0006


def _latest_clean_checkout() -> tuple[int, str]:
    """(round number, text of its "Checks and clean-checkout numbers" section) of the last round that has one."""
    rounds = re.split(r"\n## Round (\d+)\b", (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8"))
    found = [(int(n), body) for n, body in zip(rounds[1::2], rounds[2::2])
             if "### Checks and clean-checkout numbers" in body]
    n, body = found[-1]
    return n, body.split("### Checks and clean-checkout numbers", 1)[1].split("\n### ", 1)[0]


def _readme_results() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Results on the development data\n", 1)[1].split("\n## ", 1)[0]


def _floats(s: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", s)]


def test_the_readme_names_the_latest_clean_checkout_round():
    n, _ = _latest_clean_checkout()
    assert re.search(rf"Measured on the code of [\d-]+, round {n}\b", _readme_results())


def test_the_readme_quotes_its_defect_ap():
    _, checks = _latest_clean_checkout()
    dev = _floats(re.search(r"dev1-4:.*?AP\s+([\d.]+ / [\d.]+ / [\d.]+ / [\d.]+)", checks, re.S).group(1))
    ti2 = _floats(re.search(r"ti2 HAADF / MAADF:.*?AP\s+([\d.]+ / [\d.]+)", checks, re.S).group(1))
    rows = {r.split("|")[1].strip().split(" (")[0]: r.split("|")[1:-1]
            for r in _readme_results().splitlines() if r.startswith("| ")}
    readme_dev = (_floats(rows["simulated dev1 / dev2"][3]) + _floats(rows["simulated dev3 / dev4"][3]))
    readme_ti2 = _floats(re.search(r"by default[^:]*: ([\d.]+ / [\d.]+)", rows["real WSe2 `wse2_ti2` HAADF / MAADF"][3]).group(1))
    assert len(readme_dev) == 4
    assert max(abs(a - b) for a, b in zip(readme_dev, dev)) <= AP_TOLERANCE, (readme_dev, dev)
    assert max(abs(a - b) for a, b in zip(readme_ti2, ti2)) <= AP_TOLERANCE, (readme_ti2, ti2)
