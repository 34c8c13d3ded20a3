"""Input-gradient backward through a compressai conv/deconv/GDN stack with the fused GDN kernels.

The codec operator's VJP (docs/reference_code.md §3.2.3) runs through g_s (and g_a) of the scale
hyperprior: ConvTranspose2d / Conv2d layers interleaved with GDN or IGDN. The weights are frozen and
only d/d(input) is needed, so instead of autograd the chain runs explicit VJPs:
* ConvTranspose2d: dx = conv2d(g, W) with the layer's stride/padding/dilation/groups (its output
  padding only appends rows that the strided conv never reads back);
* Conv2d: dx = conv_transpose2d via ``torch.nn.grad.conv2d_input`` (needs the input's shape);
* GDN / IGDN: ``gdn_backward`` (needs the layer's input).
Biases do not enter input gradients.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .gdn import gdn, gdn_backward, gdn_parameters

__all__ = ["GDNChain"]


class GDNChain:
    """A frozen Conv2d/ConvTranspose2d/GDN stack (e.g. ScaleHyperprior's ``g_s`` or ``g_a``).

    ``forward(x)`` returns the output and what ``input_grad`` needs (the GDN inputs and the conv input
    shapes); ``input_grad(saved, grad_out)`` returns d<grad_out, output>/d input. The effective GDN
    parameters are read once, here: build a new chain if the module's weights change.
    ``precision``: of the GDN channel mix, see ``idemrt.kernels.gdn``.
    """

    def __init__(self, layers, precision: str = "tf32x3"):
        from compressai.layers import GDN

        self.layers = list(layers)
        self.precision = precision
        self.gdn_params = {}
        for i, layer in enumerate(self.layers):
            if type(layer) is GDN:
                self.gdn_params[i] = gdn_parameters(layer)
            elif type(layer) in (nn.Conv2d, nn.ConvTranspose2d):
                if layer.padding_mode != "zeros":
                    raise ValueError(f"layer {i}: padding_mode {layer.padding_mode!r} is not supported")
            else:
                raise TypeError(f"layer {i}: {type(layer).__name__} is not supported (Conv2d, ConvTranspose2d, GDN)")

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        saved = []
        for i, layer in enumerate(self.layers):
            if i in self.gdn_params:
                saved.append(x)
                x = gdn(x, *self.gdn_params[i], precision=self.precision)
            else:
                saved.append(x.shape)
                x = layer(x)
        return x, saved

    @torch.no_grad()
    def input_grad(self, saved, grad: torch.Tensor) -> torch.Tensor:
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if i in self.gdn_params:
                grad = gdn_backward(saved[i], grad, *self.gdn_params[i], precision=self.precision)
            elif isinstance(layer, nn.ConvTranspose2d):
                grad = F.conv2d(grad, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                grad = torch.nn.grad.conv2d_input(saved[i], layer.weight, grad, layer.stride, layer.padding,
                                                  layer.dilation, layer.groups)
        return grad
