"""What a batch run reports: one :class:`InputResult` per input, the :class:`BatchReport` of the run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EXIT_ERROR, EXIT_OK, EXIT_SKIPPED

__all__ = ["InputResult", "BatchReport"]


@dataclass
class InputResult:
    """What happened to one input in a batch run.

    ``status``: ``done`` (processed now), ``current`` (finished by an earlier run, not touched),
    ``partial`` (processed, but some frames failed), ``skipped`` (could not be read), ``failed``
    (an error while processing).
    """

    name: str
    path: str
    status: str
    reason: str | None = None
    n_sites: int = 0
    n_defects: int = 0
    seconds: float = 0.0
    frames: int | None = None
    warnings: list = field(default_factory=list)  # results that cannot be fully trusted, and why

    @property
    def ok(self) -> bool:
        return self.status in ("done", "current")


@dataclass
class BatchReport:
    """Result of :func:`run_batch`."""

    out_dir: Path
    results: list[InputResult]
    config_hash: str
    model_path: Path | None = None
    model_sha256: str | None = None
    model_trained: bool = False
    #: the steps the shipped model was fine-tuned for this run (``--finetune N``; 0: trained from scratch or not trained)
    model_finetuned_steps: int = 0
    model_source: str | None = None
    #: what ran the model's inference this run: "compiled" (no torch) or "torch"; None when nothing was encoded
    model_engine: str | None = None
    #: why the shipped model was refused (checksum, input contract, ...) and a model trained instead; None: it was not
    model_refused: str | None = None
    train_seconds: float = 0.0
    stage_table: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scheduler: str | None = None
    #: entries of the input folders that could not be looked at (also in ``results``, as skipped)
    problems: list[InputResult] = field(default_factory=list)
    #: this run's values of the settings that change no result (:func:`stemfast.config.neutral_settings`)
    neutral_settings: dict = field(default_factory=dict)

    @property
    def skipped(self) -> list[InputResult]:
        """Inputs without full results (skipped, failed or partial), with their reasons."""
        return [r for r in self.results if not r.ok]

    @property
    def did_work(self) -> bool:
        """False when the run found everything current: nothing read, trained or written."""
        found = {id(r) for r in self.problems}  # seen again, not work
        return self.model_trained or any(r.status in ("done", "partial", "failed") for r in self.results) \
            or any(r.status == "skipped" and not (r.reason or "").startswith("(cached)") and id(r) not in found
                   for r in self.results)

    @property
    def exit_code(self) -> int:
        if not self.results:
            return EXIT_ERROR
        return EXIT_OK if all(r.ok for r in self.results) else EXIT_SKIPPED

    def by_name(self, name: str) -> InputResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)
