"""Facts every part of pruneflow shares, in one import-light module (no torch, no pydantic).

The spec validates against these, the Airflow forms are generated from them, and the plugin
checks URLs with them: one definition each.
"""

from __future__ import annotations

import re

#: Names and ids (trials, studies, groups, baselines): what is safe as a folder name and in a URL.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@=-]{0,99}$"
ID_RE = re.compile(ID_PATTERN)
ID_RULE = "1-100 characters of letters, digits, '_', '.', '-', '@', '=', starting with a letter or digit"

#: The largest fraction of a layer's filters a trial may remove.
MAX_SPARSITY = 0.95

#: Filter importance criteria.
CRITERIA = ("l1", "l2", "bn-scale", "taylor", "random")

#: Models of the built-in registry (``pruneflow.models``; a test checks the two agree).
MODEL_NAMES = (
    "densenet_tiny", "mobilenet_tiny", "mobilenetv2", "resnet110", "resnet20", "resnet32", "resnet44",
    "resnet56", "resnext_tiny", "se_resnet_tiny", "shufflenet_tiny", "smallcnn", "vgg11", "vgg16",
)

#: Data sets ``pruneflow.data`` can load.
DATASETS = ("digits", "fashion-mnist", "cifar10", "imagefolder")


def is_id(value: object) -> bool:
    """True for a string that is an id as a whole (``fullmatch``: ``$`` alone would let a trailing newline in)."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None
