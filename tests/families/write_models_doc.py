"""Run the family matrix and write docs/models.md from what it recorded: `python tests/families/write_models_doc.py`.

Each check a test passed is recorded (LORATUNE_FAMILIES_JSON); a check with no record failed or did not run,
and the table says FAILS, so nothing is hidden.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from families import FAMILIES, VOCAB  # noqa: E402

CHECKS = ["padded", "packed", "shared_prefix", "PEFT loads", "merge", "generate", "serve"]
KINDS = {"causal": "causal LM", "encoder": "encoder (classification)", "seq2seq": "seq2seq"}


def run_matrix() -> tuple[list[dict], int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matrix.jsonl"
        env = {**os.environ, "LORATUNE_FAMILIES_JSON": str(path), "HF_HUB_OFFLINE": "1"}
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "tests/families"],
                              cwd=ROOT, env=env).returncode
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return rows, code


def table(rows: list[dict]) -> str:
    found = {(r["family"], r["check"]): r["outcome"] for r in rows}
    lines = ["| family | kind | " + " | ".join(CHECKS) + " |", "|---" * (len(CHECKS) + 2) + "|"]
    notes = []
    for family in FAMILIES:
        cells = []
        for check in CHECKS:
            outcome = found.get((family.name, check))
            if outcome is None:
                causal_only = check in ("packed", "shared_prefix", "serve")
                outcome = "n/a" if causal_only and family.kind != "causal" else "FAILS"
            if outcome.startswith("falls back"):
                notes.append(f"- {family.name}, {check}: {outcome}")
                outcome = "falls back (see below)"
            cells.append(outcome.split(" (")[0] if outcome.startswith("n/a") else outcome)
        lines.append(f"| {family.name} | {KINDS[family.kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nFallbacks:\n\n" + "\n".join(notes) if notes else "")


def main() -> int:
    rows, code = run_matrix()
    version = rows[0]["transformers"] if rows else "?"
    text = f"""# Model families

Written by `python tests/families/write_models_doc.py` from a run of the family matrix
(`tests/families/test_families.py`, part of `make test`) with transformers {version}. Each family is a tiny
random-weight model (2 layers, hidden size 32, a {len(VOCAB)}-word vocabulary, seed 0) trained for 3 steps with
`loratune.train.fit` and LoRA on every linear layer (`all-linear`); a classifier's head is trained and
saved with the adapter, as PEFT does.

- **padded / packed / shared_prefix** (`train.batching`): the run trains, and the losses of its steps equal
  the padded batch's (relative 1e-4). Packed and shared-prefix batches are for causal LMs only (n/a).
- **PEFT loads**: `peft.PeftModel.from_pretrained` on the saved adapter gives loratune's logits.
- **merge**: `loratune.merge` gives the unmerged adapter's logits.
- **generate**: `model.generate` with the adapter (classifiers: n/a).
- **serve**: one `/v1/completions` request through the server app on the trained adapter (causal LMs).

FAILS means the check's test failed or did not run; n/a means the check does not apply to the kind.

{table(rows)}
"""
    (ROOT / "docs" / "models.md").write_text(text, encoding="utf-8")
    print(f"docs/models.md written (pytest exit code {code})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
