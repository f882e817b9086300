"""The resumable store of a dataset trace: one parquet file per traced fact, and run.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lens_rome.errors import SavedFileError
from lens_rome.storage import check_resumable, check_same_items, replacing
from lens_rome.tracing.fact import TraceSettings

RUN_FILE = "run.json"
FACTS_DIR = "facts"
# Settings that runs of older versions did not record: such a run resumes, with a warning.
UNRECORDED = ("fingerprint",)
RUN_FACTS = "fact_hashes"  # run.json's record of each fact's content hash


class FactStore:
    """``out/facts/<known_id>.parquet``, one file per traced fact, plus ``out/run.json``.

    A fact's file appears whole or not at all (written beside and renamed), so
    the set of files is exactly the set of finished facts.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.facts_dir = self.out / FACTS_DIR

    def path(self, known_id: int) -> Path:
        return self.facts_dir / f"{int(known_id)}.parquet"

    def done(self) -> set[int]:
        if not self.facts_dir.is_dir():
            return set()
        return {int(p.stem) for p in self.facts_dir.glob("*.parquet") if p.stem.isdigit()}

    def write(self, known_id: int, frame: pd.DataFrame) -> Path:
        with replacing(self.path(known_id), overwrite=True) as tmp:
            frame.to_parquet(tmp, index=False)
        return self.path(known_id)

    def read(self) -> pd.DataFrame:
        files = sorted(self.facts_dir.glob("*.parquet"), key=lambda p: int(p.stem))
        if not files:
            raise SavedFileError(f"{self.facts_dir} holds no traced facts")
        frames = []
        for path in files:
            try:
                frames.append(pd.read_parquet(path))
            except Exception as error:  # pyarrow raises several types for damaged files
                raise SavedFileError(f"{path} is unreadable ({error}); delete it and resume the run "
                                 "to trace that fact again") from None
        return pd.concat(frames, ignore_index=True)

    def check_settings(self, settings: TraceSettings,
                       facts: dict[str, str] | None = None) -> None:
        """Record ``settings`` and ``facts`` (known id -> content hash) in run.json, or check
        them against a stopped run's: the same settings, and the same contents for the
        facts both name (more facts may be added)."""
        path = self.out / RUN_FILE
        wanted = settings.to_dict()
        if path.exists():
            try:
                run = json.loads(path.read_text())
                saved = run["settings"]
                saved.setdefault("method", "exact")  # runs from before attribution existed
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise SavedFileError(f"{path} is damaged ({error}); choose a new --out") from None
            check_resumable(self.out, wanted, saved, fix="choose a new --out",
                            unrecorded=UNRECORDED)
            if facts is not None:
                merged = check_same_items(self.out, run.get(RUN_FACTS), facts, what="fact",
                                          fix="choose a new --out")
                if merged != run.get(RUN_FACTS):
                    self._write({**run, RUN_FACTS: merged})
        elif self.done():
            raise SavedFileError(f"{self.facts_dir} holds traced facts but no {RUN_FILE}; "
                              "choose a new --out")
        else:
            self._write({"settings": wanted, **({RUN_FACTS: facts} if facts is not None
                                                else {})})

    def write_run(self, settings: TraceSettings, report: dict) -> None:
        """Record ``settings`` and the run's ``report`` (keeping the facts' hashes)."""
        path = self.out / RUN_FILE
        facts = json.loads(path.read_text()).get(RUN_FACTS) if path.exists() else None
        self._write({"settings": settings.to_dict(), **report,
                     **({RUN_FACTS: facts} if facts is not None else {})})

    def _write(self, run: dict) -> None:
        with replacing(self.out / RUN_FILE, overwrite=True) as tmp:
            tmp.write_text(json.dumps(run, indent=2))

    def read_run(self) -> dict:
        return json.loads((self.out / RUN_FILE).read_text())
