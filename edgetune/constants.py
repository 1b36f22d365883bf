"""Numbers both halves must agree on, defined once (torch-free: the device imports this).

* ``IGNORE_INDEX``: the label of a position that takes no loss (prompt tokens, padding). It is
  PyTorch's ``cross_entropy`` default and ONNX ``SoftmaxCrossEntropyLoss``'s ``ignore_index`` as
  the exporter writes it, so the data pipeline, the training graph and evaluation must use it.
* ``OPSET``: the ONNX opset of the exported training and generation graphs. 17 is what the
  TorchScript exporter and ONNX Runtime 1.19.2's training build agree on for these graphs.
"""

IGNORE_INDEX = -100
OPSET = 17
