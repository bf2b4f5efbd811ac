"""The colour of segment 1, 2, ... in every output (files, DICOM SEG, the service's results)."""
from __future__ import annotations

# Distinct, colour-blind-friendly colours (Okabe-Ito, then Tableau) for segments 1, 2, ...
SEGMENT_COLORS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
                  (204, 121, 167), (148, 103, 189), (140, 86, 75), (188, 189, 34)]


def segment_color(label: int) -> tuple[int, int, int]:
    return SEGMENT_COLORS[(label - 1) % len(SEGMENT_COLORS)]
