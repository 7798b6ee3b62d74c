"""ResNets that return stage features, the distillation pair and teacher loading."""
from fastcd.models.pair import DistillOutputs, StudentWithConnectors, TeacherTargets, connector, freeze, teacher_targets
from fastcd.models.resnet import ARCHS, FeatureResNet, NetOutput, build_resnet

__all__ = ["ARCHS", "DistillOutputs", "FeatureResNet", "NetOutput", "StudentWithConnectors", "build_resnet",
           "connector", "freeze", "teacher_targets", "TeacherTargets"]
