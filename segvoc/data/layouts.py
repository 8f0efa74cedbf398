"""A dataset's description: where its files are and what its classes are. PASCAL VOC (``data=voc``) and your own
folder (``data=folder``) are two layouts of the one reader (``segvoc.data.pairs``); ``data.layout`` picks one."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, open_dict

from segvoc.data.folder import FolderLayout, read_classes
from segvoc.data.palette import ClassSet
from segvoc.data.voc import VOC_CLASS_SET, VOCLayout
from segvoc.errors import ConfigError

LAYOUTS = ("voc", "folder")


def open_layout(data: Mapping, classes: ClassSet | None = None) -> Any:
    """The layout of a ``data`` node (``data.layout``; configs of 0.4 and earlier have none: VOC), checked on
    disk."""
    layout = str(data.get("layout") or "voc")
    if layout == "folder":
        return FolderLayout(data["root"], float(data.get("val_fraction", 0.1)), float(data.get("test_fraction", 0.1)),
                            int(data.get("split_seed", 0)), classes)
    return VOCLayout(data["root"], str(data.get("train_split", "train")), float(data.get("test_fraction", 0.5)),
                     int(data.get("split_seed", 0)), classes or VOC_CLASS_SET)


def dataset_classes(data: Mapping) -> ClassSet:
    """The classes of a ``data`` node: those it states (a run's config, once resolved), else its layout's
    (``classes.yaml`` of a folder dataset; VOC's names). A ``data.num_classes`` that disagrees is a ``ConfigError``
    naming both."""
    if data.get("class_names"):
        classes = ClassSet.from_config(data)
    elif str(data.get("layout") or "voc") == "folder":
        classes = read_classes(data["root"])
    else:
        n = int(data.get("num_classes") or len(VOC_CLASS_SET.names))
        if n > len(VOC_CLASS_SET.names):
            raise ConfigError(f"data.num_classes={n}: VOC has {len(VOC_CLASS_SET.names)} classes; use data=folder "
                              "with a classes.yaml for other classes")
        classes = ClassSet(VOC_CLASS_SET.names[:n], VOC_CLASS_SET.colors[:n], VOC_CLASS_SET.ignore_index)
    stated = data.get("num_classes")
    if stated is not None and int(stated) != classes.num_classes:
        source = (f"{data['root']}/classes.yaml" if str(data.get("layout")) == "folder" and not data.get("class_names")
                  else "data.class_names")
        raise ConfigError(f"data.num_classes={stated}: {source} names {classes.num_classes} classes; drop "
                          "data.num_classes (it comes from the classes) or fix the class list")
    return classes


def with_classes(cfg: DictConfig) -> DictConfig:
    """A copy of a run config whose ``data`` node states its classes (``num_classes``, ``class_names``, ``colors``,
    ``ignore_index``), as checkpoints and every output then carry them."""
    classes = dataset_classes(cfg.data)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.num_classes = classes.num_classes
        cfg.data.update(classes.to_config())
    return cfg
