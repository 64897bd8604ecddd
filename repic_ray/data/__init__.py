"""Data: on-disk formats (`formats`), image loading (`images`), the synthetic concept world
(`synthetic`) and its closed vocabulary (`vocab`)."""

from repic_ray.data.formats import (
    METHODS,
    CaptionRecord,
    Concept,
    ConceptDatabase,
    DataError,
    TrainSample,
    check_images,
    load_captions,
    load_database,
    load_samples,
    save_captions,
    save_database,
    save_samples,
)
from repic_ray.data.images import ImageError, load_image

__all__ = [
    "METHODS",
    "CaptionRecord",
    "Concept",
    "ConceptDatabase",
    "DataError",
    "ImageError",
    "TrainSample",
    "check_images",
    "load_captions",
    "load_database",
    "load_image",
    "load_samples",
    "save_captions",
    "save_database",
    "save_samples",
]
