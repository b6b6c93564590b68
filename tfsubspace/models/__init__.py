"""The models: reference teachers to train (`zoo`: LeNet-5, VGG-16, wide ResNets) and the
parameter and multiply-accumulate counts of any Keras model (`stats`)."""

from tfsubspace.models.zoo import MODELS, build, lenet5, vgg16, wide_resnet

__all__ = ["MODELS", "build", "lenet5", "vgg16", "wide_resnet"]
