"""The tile grid of each slide: the step between neighbouring tile positions, per slide and level."""

from __future__ import annotations

from sqlalchemy import bindparam, text

from search.storage.repository import Repository, chunks

# The smallest positive gap between distinct positions along one axis is the grid step, whatever pixel
# frame and stride the reader used (as in TileRepository.neighbours).
_STEPS = """
WITH pos AS (
    SELECT DISTINCT s.slide_key AS slide, t.level AS level, t.{axis} AS v
    FROM tiles t JOIN slides s ON s.id = t.slide_id
    WHERE s.slide_key IN :keys AND t.{axis} IS NOT NULL
),
gaps AS (
    SELECT slide, level, v - LAG(v) OVER (PARTITION BY slide, level ORDER BY v) AS gap FROM pos
)
SELECT slide, level, MIN(gap) FROM gaps WHERE gap > 0 GROUP BY slide, level
"""


class GridRepository(Repository):
    def grid_steps(self, slide_keys: list[str]) -> dict[tuple[str, int | None], tuple[int, int]]:
        """{(slide_key, level): (step_x, step_y)} for the given slides (0 along an axis with one position)."""
        steps: dict[tuple[str, int | None], list[int]] = {}
        with self.session() as s:
            for chunk in chunks(sorted(set(slide_keys))):
                for n, axis in enumerate(("x", "y")):
                    stmt = text(_STEPS.format(axis=axis)).bindparams(bindparam("keys", expanding=True))
                    for slide, level, gap in s.execute(stmt, {"keys": list(chunk)}):
                        steps.setdefault((slide, level), [0, 0])[n] = int(gap)
        return {key: (value[0], value[1]) for key, value in steps.items()}
