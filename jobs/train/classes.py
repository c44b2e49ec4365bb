"""Matching a dataset's classes to a model's by name: an ImageFolder's folders (sorted, as ImageFolder indexes
them), a WebDataset's `classes.json` or the built-in set's names against the `class_names` a checkpoint
carries (or, for a validation set, the training set's). Labels are then the model's indices, whatever
order the folders sort in; a dataset whose classes cannot all be matched is refused with both lists.

A data class matches a model class when, in this order:
1. the names are equal;
2. the names are equal once case, spaces and punctuation are left out (`T-shirt_top`, `t-shirt top` and
   `T-shirt/top` are one class: a folder cannot hold the `/` of Fashion-MNIST's "T-shirt/top");
3. every data class is a number: the model class of that number (its names are numbers too: `00` is "0"),
   else the class index (folders 00–09 for a model whose names are words, in the model's order).
A model that also carries class ids (an imported ImageNet model: WordNet IDs such as `n01440764`, which
ImageNet-style folders are named after) has them matched first, exactly.
A model without class names: numbers are class indices; other names keep the data's order (sorted folders,
classes.json's order: all that can be known), and `ClassMatch.how` says so.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence

LIST_SHOWN = 12  # names shown of a long class list (ImageNet's 1000) in an error


class ClassMismatch(ValueError):
    """The dataset's classes cannot be matched to the model's."""


@dataclass(frozen=True)
class ClassMatch:
    labels: tuple[int, ...]  # data class i (its sorted folder / classes.json position) → model class index
    how: str  # how they were matched, for a person: "same names", "by name", …

    @property
    def identity(self) -> bool:
        return self.labels == tuple(range(len(self.labels)))


def name_key(name: str) -> str:
    """A class name without case, spaces or punctuation (Unicode letters and digits kept)."""
    return "".join(c for c in unicodedata.normalize("NFKC", name).casefold() if c.isalnum())


def _number(name: str) -> Optional[int]:
    s = name.strip()
    return int(s) if s.isascii() and s.isdigit() else None


def match_classes(data: Sequence[str], model: Optional[Sequence[str]], num_classes: int, *,
                  data_name: str = "the data", model_name: str = "the model",
                  class_ids: Optional[Sequence[str]] = None) -> ClassMatch:
    """Each of `data`'s classes as an index into the model's `num_classes` classes (named `model`, or None
    when it has no names). `class_ids`: the model's class identifiers, when it has them besides its names
    (ImageNet's WordNet IDs, the folder names of an ImageNet-style validation set), matched first and
    exactly. Raises ClassMismatch, with both lists, when a class has no match or two classes land on one."""
    data = [str(c) for c in data]
    model = None if model is None else [str(c) for c in model]
    if class_ids is not None and len(class_ids) == num_classes and data and set(data) <= set(class_ids):
        where = {c: i for i, c in enumerate(class_ids)}
        return _checked([where[d] for d in data], "by class id", data, list(class_ids), num_classes, data_name,
                        model_name)
    if model is not None and len(model) != num_classes:
        raise ClassMismatch(f"{model_name} names {len(model)} classes but has {num_classes} outputs")
    if model is not None and data == model:
        return ClassMatch(tuple(range(len(data))), "same names, same order")
    named = _by_name(data, model) if model is not None else None
    if named is not None and min(named, default=0) >= 0:
        found = named
        renamed = [f"{d!r} → {model[i]!r}" for d, i in zip(data, found) if d != model[i]]
        how = "by name" + (f" (ignoring case, spaces and punctuation: {', '.join(renamed[:4])}"
                           f"{', …' if len(renamed) > 4 else ''})" if renamed else "")
        return _checked(found, how, data, model, num_classes, data_name, model_name)
    numbers = [_number(d) for d in data]
    if data and all(n is not None for n in numbers):
        model_numbers = [_number(m) for m in model] if model is not None else None
        if model_numbers is not None and all(n is not None for n in model_numbers):
            where = {n: i for i, n in enumerate(model_numbers)}
            found = [where.get(n, -1) for n in numbers]
            return _checked(found, "by number", data, model, num_classes, data_name, model_name)
        return _checked(numbers, "numbers as class indices", data, model, num_classes, data_name, model_name)
    if named is not None:  # names the model does not have
        return _checked(named, "by name", data, model, num_classes, data_name, model_name)
    if len(data) == num_classes:
        return ClassMatch(tuple(range(len(data))), "in the data's order (sorted folders): the model names no classes")
    raise ClassMismatch(_mismatch(data, model, num_classes, data_name, model_name))


def _by_name(data: list[str], model: list[str]) -> list[int]:
    """Model indices by exact name, else by `name_key` (-1: no match, or two model classes alike)."""
    exact = {m: i for i, m in enumerate(model)}
    keys: dict[str, list[int]] = {}
    for i, m in enumerate(model):
        keys.setdefault(name_key(m), []).append(i)
    out = []
    for d in data:
        if d in exact:
            out.append(exact[d])
            continue
        hits = keys.get(name_key(d), [])
        out.append(hits[0] if len(hits) == 1 else -1)  # none, or two model classes alike: no guess
    return out


def _checked(found: list[int], how: str, data, model, num_classes: int, data_name: str, model_name: str) -> ClassMatch:
    bad = [d for d, i in zip(data, found) if not 0 <= i < num_classes]
    taken: dict[int, str] = {}
    twice = []
    for d, i in zip(data, found):
        if i in taken and not bad:
            twice.append(f"{taken[i]!r} and {d!r}")
        taken.setdefault(i, d)
    if bad or twice:
        why = (f"no model class for {', '.join(map(repr, bad[:LIST_SHOWN]))}" if bad
               else f"one model class for {'; '.join(twice[:4])}")
        raise ClassMismatch(_mismatch(data, model, num_classes, data_name, model_name, why))
    return ClassMatch(tuple(found), how)


def _shown(names: Sequence[str]) -> str:
    head = ", ".join(map(repr, names[:LIST_SHOWN]))
    return f"[{head}{f', … ({len(names)} in all)' if len(names) > LIST_SHOWN else ''}]"


def _mismatch(data, model, num_classes: int, data_name: str, model_name: str, why: str = "") -> str:
    theirs = _shown(model) if model is not None else f"no names ({num_classes} classes)"
    return (f"the classes of {data_name} do not match {model_name}'s"
            + (f" ({why})" if why else "") + f": {data_name} has {_shown(data)}; {model_name} has {theirs}. "
            "Name each class folder (or classes.json entry) after the model's class, or number them "
            f"0–{num_classes - 1} in the model's order")
