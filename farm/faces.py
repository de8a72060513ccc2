"""Faces for the identity QC metric: find a face, give it a 512-d identity embedding, and compare a
keyframe's face with a character's reference photos (docs/characters.md).

Two analysers behind one interface:
- `InsightFaces`: insightface's `FaceAnalysis` (antelopev2 or buffalo_l, ONNX through onnxruntime)
  from a local model folder the farm config names (`models.paths["faces"]`); never downloads.
- `StandInFaces`: the tiny renders' stand-in, a deterministic function of the pixels (the whole
  image is "the face"). Used only with `--models tiny`, labelled as such, and never gates.

Where neither applies (a real render without insightface or its models) the metric is recorded as
unavailable (None), never estimated.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

STAND_IN = "stand-in"
EMBEDDING_DIM = 512
# insightface's 5 points (eyes, nose, mouth corners) at their places in its 112x112 aligned crop
CANONICAL_POINTS = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) / 112


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    points: np.ndarray  # (5, 2) keypoints in pixels
    embedding: np.ndarray  # (512,) unit length

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


class FaceAnalyser(Protocol):
    name: str

    def faces(self, image: np.ndarray) -> list[Face]:
        """The faces in an RGB uint8 image, largest first."""
        ...


class StandInFaces:
    """The tiny renders' face analyser: the whole image is one face, its embedding the image at 16x32
    in grey, centred and scaled to unit length (alike images score near 1, unrelated ones near 0), its
    keypoints insightface's canonical ones stretched over the image."""

    name = STAND_IN

    def faces(self, image: np.ndarray) -> list[Face]:
        grey = cv2.cvtColor(np.ascontiguousarray(image[..., :3], dtype=np.uint8), cv2.COLOR_RGB2GRAY)
        small = cv2.resize(grey, (16, 32), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
        small -= small.mean()
        norm = np.linalg.norm(small)
        embedding = small / norm if norm > 0 else np.zeros(EMBEDDING_DIM)
        h, w = grey.shape
        return [Face((0.0, 0.0, float(w), float(h)), CANONICAL_POINTS * [w, h], embedding)]


class InsightFaces:
    """insightface's detector and recogniser from a local folder (`<root>/models/<name>/*.onnx`)."""

    def __init__(self, root: str, model: str = "antelopev2") -> None:
        from insightface.app import FaceAnalysis  # optional: `pip install insightface onnxruntime`

        self.name = f"insightface:{model}"
        self.app = FaceAnalysis(name=model, root=root, providers=["CPUExecutionProvider"])
        self.app.prepare(ctx_id=-1, det_size=(640, 640))

    def faces(self, image: np.ndarray) -> list[Face]:
        found = self.app.get(np.ascontiguousarray(image[..., ::-1]))  # insightface reads BGR
        out = [Face((float(f.bbox[0]), float(f.bbox[1]), float(f.bbox[2]), float(f.bbox[3])), np.asarray(f.kps),
                    np.asarray(f.normed_embedding)) for f in found]
        return sorted(out, key=lambda f: f.area, reverse=True)


@functools.cache
def analyser_for(spec: str | None) -> FaceAnalyser | None:
    """`spec`: "stand-in", "insightface:<model>:<folder>", or None; None where it cannot run here.
    One per process: insightface loads its ONNX models once, not for every take's QC."""
    if spec == STAND_IN:
        return StandInFaces()
    if spec and spec.startswith("insightface:"):
        _, model, root = spec.split(":", 2)
        try:
            return InsightFaces(root, model)
        except (ImportError, OSError, RuntimeError, AssertionError):  # not installed, or its models are not there
            return None
    return None


def load_rgb(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path} is not an image OpenCV can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def similarity(analyser: FaceAnalyser, image: np.ndarray, references: Sequence[np.ndarray]) -> float | None:
    """Cosine similarity of the image's largest face to the mean of the references' largest faces;
    None where the image or every reference shows no face."""
    found = analyser.faces(image)
    refs = [faces[0].embedding for faces in (analyser.faces(r) for r in references) if faces]
    if not found or not refs:
        return None
    mean = np.mean(refs, axis=0)
    norm = np.linalg.norm(mean) * np.linalg.norm(found[0].embedding)
    return float(np.dot(mean, found[0].embedding) / norm) if norm > 0 else None


def identity_metrics(start: np.ndarray | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The QC's identity metric for a take: the keyframe's similarity to each character it shows (the
    lowest of them is `identity`, what gates), and which analyser measured it. {} for a shot without
    characters."""
    if not options or not options.get("characters"):
        return {}
    analyser = analyser_for(options.get("faces"))
    if analyser is None or start is None:
        return {"identity": None, "identity_by": "unavailable: no face model here (docs/characters.md)"}
    per = {name: similarity(analyser, start, [load_rgb(p) for p in paths])
           for name, paths in options["characters"].items()}
    values = [v for v in per.values() if v is not None]
    return {"identity": min(values) if values else None, "identity_by": analyser.name,
            "identity_per_character": per}


def faces_spec(tiny: bool, paths: Mapping[str, str]) -> str | None:
    """Which analyser a job's QC uses: the stand-in for tiny renders, insightface where the farm
    config names its folder (`models.paths["faces"]`, model `models.paths["faces_model"]` or antelopev2)."""
    if tiny:
        return STAND_IN
    root = paths.get("faces")
    if not root or not Path(root).is_dir():
        return None
    return f"insightface:{paths.get('faces_model', 'antelopev2')}:{root}"
