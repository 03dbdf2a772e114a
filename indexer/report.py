"""What an indexing run did, per source and in all: the counts, the summary a person reads, the job's message."""

from __future__ import annotations

from dataclasses import dataclass, field

from indexer.slides import SlideReport


@dataclass
class SourceReport:
    uri: str
    kind: str = ""
    source_id: int | None = None
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    reembedded: int = 0
    removed: int = 0
    errors: int = 0
    # Why the input could not be read at all, when it could not, and how many of its tiles indexed before
    # are kept meanwhile.
    problem: str = ""
    kept: int = 0

    @property
    def tiles(self) -> int:
        """Tiles of this input that are indexed and up to date after the run."""
        return self.new + self.changed + self.unchanged + self.reembedded

    @property
    def yielded_nothing(self) -> bool:
        return self.tiles == 0 and self.removed == 0 and self.kept == 0

    def line(self) -> str:
        if self.yielded_nothing:
            return f"{self.uri}: no tiles ({self.problem or 'no tile image found in it'})"
        if self.kept:
            return f"{self.uri}: not read ({self.problem}); its {self.kept} indexed tiles are kept"
        return (
            f"{self.uri} ({self.kind or '?'}): {self.new} new, {self.changed} changed, {self.reembedded} re-embedded, "
            f"{self.removed} removed, {self.unchanged} unchanged, {self.errors} errors"
        )


@dataclass
class RunReport:
    job_id: int
    sources: list[SourceReport] = field(default_factory=list)
    texts_embedded: int = 0
    build: dict | None = None
    manifest: str = ""
    # Why the live index had to be rebuilt though nothing changed, when it was damaged.
    damage: str | None = None
    slides: SlideReport | None = None

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.sources)

    @property
    def tiles(self) -> int:
        return sum(s.tiles for s in self.sources)

    def summary(self) -> str:
        lines = [self.manifest] if self.manifest else []
        lines += [s.line() for s in self.sources]
        if self.texts_embedded:
            lines.append(f"texts: {self.texts_embedded} embedded")
        if self.damage:
            lines.append(
                f"index: the live index was damaged ({self.damage}): rebuilt from the stored vectors, "
                "nothing re-embedded"
            )
        if self.build:
            lines.append(f"index: build {self.build['id']}, {self.build['index_type']}, {self.build['count']} vectors")
        if self.slides:
            kinds = ", ".join(
                f"{k} {self.slides.updated.get(k, 0)} updated / {self.slides.removed.get(k, 0)} removed"
                for k in self.slides.updated
            )
            lines.append(f"slide vectors: {kinds}")
            lines.extend(f"slide vectors: {error}" for error in self.slides.errors)
        return "\n".join(lines)
