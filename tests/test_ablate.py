"""benchmarks/ablate.py pairs: paired differences of evaluated sets, one set or the mean of several."""

import json
import subprocess
import sys
from pathlib import Path

ABLATE = Path(__file__).resolve().parents[1] / "benchmarks" / "ablate.py"


def _pairs(tmp_path: Path, *pairs: str) -> subprocess.CompletedProcess:
    results = {
        "start": {"seeds": [0, 1, 2], "fractions": ["0.01"], "accuracy": [[50.0], [52.0], [54.0]]},
        "a.pt": {"seeds": [0, 1, 2], "fractions": ["0.01"], "accuracy": [[51.0], [54.0], [55.0]]},
        "b.pt": {"seeds": [0, 1, 2], "fractions": ["0.01"], "accuracy": [[53.0], [54.0], [59.0]]},
        "other_seeds": {"seeds": [3, 4, 5], "fractions": ["0.01"], "accuracy": [[1.0], [2.0], [3.0]]},
    }
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(results))
    command = [sys.executable, str(ABLATE), "pairs", "--json", str(path)]
    for pair in pairs:
        command += ["--pair", pair]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_pairs_of_one_set_and_of_the_mean_of_several(tmp_path: Path) -> None:
    done = _pairs(tmp_path, "a.pt:start", "a.pt+b.pt:start")
    assert done.returncode == 0, done.stderr
    one, mean = done.stdout.splitlines()
    # a − start per seed: 1, 2, 1 -> mean 1.33, sd 0.58, s.e. 0.33
    assert one.startswith("a.pt - start: 1% +1.3 ± 0.3 s.e. (sd 0.6)") and one.endswith("(n 3)")
    # (a + b) / 2 − start per seed: 2, 2, 3 -> mean 2.33, sd 0.58, s.e. 0.33
    assert mean.startswith("a.pt+b.pt - start: 1% +2.3 ± 0.3 s.e. (sd 0.6)")


def test_pairs_refuse_unknown_sets_and_sets_of_other_seeds(tmp_path: Path) -> None:
    unknown = _pairs(tmp_path, "a.pt+nope.pt:start")
    assert unknown.returncode != 0 and "no set 'nope.pt'" in unknown.stderr
    mixed = _pairs(tmp_path, "a.pt+other_seeds:start")
    assert mixed.returncode != 0 and "different seeds" in mixed.stderr
