"""Progress bars for a render, driven by the director's events (the same events the API streams)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class ProgressBars:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stages: tqdm | None = None
        self.frames: tqdm | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = event["type"]
        if kind == "job_started":
            self.stages = tqdm(total=event["stages"], desc="stages", unit="stage", file=sys.stderr, position=0)
            self.frames = tqdm(total=event["frames"], desc="frames", unit="frame", file=sys.stderr, position=1)
        elif kind == "stage_started" and self.stages is not None:
            self.stages.set_postfix_str(f"{event['stage']} on {event['worker']} ({event['tier']})")
        elif kind == "stage_finished" and self.stages is not None and self.frames is not None:
            self.stages.update(1)
            self.frames.update(event.get("frames", 0))
        elif kind == "qc_retake" and self.stages is not None and self.frames is not None:
            self.stages.total += event["stages"]  # the bars grow by the retake's stages and frames
            self.frames.total += event["frames"]
            self.stages.write(f"shot {event['shot']} failed quality control ({', '.join(event['because'])}): "
                              f"take {event['take']}")
        elif kind == "qc" and event["final"] and not event["passed"] and self.stages is not None:
            self.stages.write(f"shot {event['shot']} failed quality control in its last take "
                              f"({', '.join(event['failed'])}); the best take is kept")
        elif kind == "stage_failed" and self.stages is not None:
            self.stages.write(f"retrying {event['stage']}: {event['error']}")
        elif kind == "job_finished":
            self.close()

    def close(self) -> None:
        for bar in (self.frames, self.stages):
            if bar is not None:
                bar.close()
        self.stages = self.frames = None
