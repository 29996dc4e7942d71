"""Texts that calibrate int8 activation ranges and rank attention heads for pruning.

Priority: ``--calibration-texts FILE`` (one text per line) > the training part of ``--dataset``
(never the held-out part the accuracy gate scores) > the built-in texts below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ner_builder.datasets import NerDataset
from ner_builder.errors import BuildError
from ner_builder.evaluate import Feeds
from ner_builder.export import SAMPLE_TEXTS

DEFAULT_LIMIT = 256

BUILTIN_TEXTS = [
    *SAMPLE_TEXTS,
    "Lionel Messi scored twice as Inter Miami beat Orlando City on Saturday night.",
    "The European Central Bank kept interest rates unchanged, President Christine Lagarde said in Frankfurt.",
    "just landed at JFK , heading to Brooklyn to see @jess_nyc before the Knicks game",
    "Netflix renewed Stranger Things for a fifth season, filming starts in Atlanta next spring.",
    "Toyota and Panasonic will build a battery plant in North Carolina.",
    "Dr. Maria Gonzalez of Johns Hopkins University presented the results at the WHO conference in Geneva.",
    "Can't believe Coldplay is playing Wembley Stadium again in June !!! #excited",
    "The Louvre in Paris reopened after renovations funded by LVMH and the French government.",
    "SpaceX launched a Falcon 9 from Cape Canaveral carrying satellites for NASA and the US Air Force.",
    "new episode of The Mandalorian tonight on Disney+ , anyone watching ?",
    "Manchester United signed a midfielder from Ajax for 40 million euros.",
    "Prime Minister Narendra Modi met Joe Biden at the White House on Thursday.",
    "Samsung unveiled the Galaxy S24 in San Jose, California, challenging Apple's iPhone.",
    "heading to Starbucks on 5th ave then the Museum of Modern Art w/ mom",
    "The Amazon river flows through Brazil, Peru and Colombia.",
    "Harry Potter and the Philosopher's Stone was written by J. K. Rowling in Edinburgh.",
    "lol the Lakers lost again , LeBron looked tired #NBA",
    "Shares of Tesla fell 5% on the Nasdaq after Elon Musk sold stock.",
    "Emma Watson and Daniel Radcliffe attended the premiere in London's Leicester Square.",
    "The University of Tokyo and Sony are developing robots for elderly care in Japan.",
    "ok",
    "Thanks !",
    "Meeting moved to Monday, see you at the Hilton in Chicago.",
    "Google Maps says the Golden Gate Bridge is closed because of fog .",
]


@dataclass(frozen=True)
class CalibrationTexts:
    texts: list[str]
    source: str


def read_text_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BuildError(f"cannot read {path}: {e}") from e
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise BuildError(f"{path} contains no texts (one per line)")
    return texts


def choose_texts(file: Path | None, train_split: NerDataset | None, limit: int = DEFAULT_LIMIT) -> CalibrationTexts:
    if file is not None:
        texts = read_text_file(file)[:limit]
        return CalibrationTexts(texts, f"file {file} ({len(texts)} texts)")
    if train_split is not None:
        texts = [" ".join(words) for words in train_split.sentences[:limit]]
        return CalibrationTexts(texts, f"{train_split.name} training split, first {len(texts)} sentences")
    return CalibrationTexts(list(BUILTIN_TEXTS), f"built-in texts ({len(BUILTIN_TEXTS)})")


def feeds(tokenizer: Any, texts: list[str], input_names: list[str], max_length: int) -> list[Feeds]:
    """One unpadded batch per text (MinMax calibration takes any shape; no padding skews the ranges)."""
    out = []
    for text in texts:
        encoded = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        out.append({name: encoded[name].astype(np.int64) for name in input_names})
    return out
