"""Models: the registered backbones (`list_backbones()`: the paper's 26, in its order) with their own, GAP or
NOAH heads (docs/interface.md, "Python"), the re-identification model of Table 9, and their parameter and MAdd
counts."""
from .backbones import backbone_info, backbone_table, list_backbones, narrows
from .classifier import Classifier
from .factory import build_head, build_model, resolve_head
from .noah import NoahHead
from .reid import ReidNet, build_reid_model

__all__ = ["build_model", "build_head", "resolve_head", "build_reid_model", "list_backbones", "backbone_info",
           "backbone_table", "narrows", "Classifier", "NoahHead", "ReidNet"]
