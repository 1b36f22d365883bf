"""Operators the stock ``onnxruntime`` CPU build runs: what a portable graph may contain.

The standard-domain list is the CPU kernel registry of stock onnxruntime 1.32.0
(``onnxruntime.capi._pybind_state.get_all_opkernel_def()``, provider CPUExecutionProvider), plus
``Constant``, which ONNX Runtime turns into an initializer when it loads a model. Training-only
kernels are absent from it, notably ``SoftmaxCrossEntropyLoss`` and ``NegativeLogLikelihoodLoss``
(stock builds would expand them through their ONNX function bodies, which divide 0 by 0 on a chunk
whose labels are all ignored; the rules rewrite them instead).
From the contrib domain only operators the gradient graph needs and stock CPU builds have had for
years are allowed. tests/test_portable_graph.py compares this list with a stock installation when
one is available.
"""

STANDARD_OPS = frozenset((
    'Abs', 'Acos', 'Acosh', 'Add', 'Affine', 'AffineGrid', 'And', 'ArgMax', 'ArgMin', 'Asin',
    'Asinh', 'Atan', 'Atanh', 'Attention', 'AveragePool', 'BatchNormalization', 'BitCast',
    'BitShift', 'BitwiseAnd', 'BitwiseNot', 'BitwiseOr', 'BitwiseXor', 'BlackmanWindow', 'Cast',
    'Ceil', 'Celu', 'Clip', 'Col2Im', 'Compress', 'Concat', 'ConcatFromSequence', 'Constant',
    'ConstantOfShape', 'Conv', 'ConvInteger', 'ConvTranspose', 'Cos', 'Cosh', 'Crop', 'CumProd',
    'CumSum', 'DFT', 'DeformConv', 'DepthToSpace', 'DequantizeLinear', 'Det', 'Div', 'Dropout',
    'DynamicQuantizeLinear', 'DynamicSlice', 'Einsum', 'Elu', 'Equal', 'Erf', 'Exp', 'Expand',
    'EyeLike', 'Flatten', 'Floor', 'GRU', 'Gather', 'GatherElements', 'GatherND', 'Gelu', 'Gemm',
    'GlobalAveragePool', 'GlobalLpPool', 'GlobalMaxPool', 'Greater', 'GreaterOrEqual', 'GridSample',
    'HammingWindow', 'HannWindow', 'HardSigmoid', 'Hardmax', 'Identity', 'If', 'ImageScaler',
    'InstanceNormalization', 'IsInf', 'IsNaN', 'LRN', 'LSTM', 'LayerNormalization', 'LeakyRelu',
    'Less', 'LessOrEqual', 'Log', 'LogSoftmax', 'Loop', 'LpNormalization', 'LpPool', 'MatMul',
    'MatMulInteger', 'Max', 'MaxPool', 'MaxRoiPool', 'MaxUnpool', 'Mean',
    'MeanVarianceNormalization', 'MelWeightMatrix', 'Min', 'Mod',
    'Mul', 'Multinomial', 'Neg', 'NonMaxSuppression', 'NonZero', 'Not', 'OneHot', 'Optional',
    'OptionalGetElement', 'OptionalHasElement', 'Or', 'PRelu', 'Pad', 'ParametricSoftplus', 'Pow',
    'QLinearConv', 'QLinearMatMul', 'QuantizeLinear', 'RMSNormalization', 'RNN', 'RandomNormal',
    'RandomNormalLike', 'RandomUniform', 'RandomUniformLike', 'Range', 'Reciprocal', 'ReduceL1',
    'ReduceL2', 'ReduceLogSum', 'ReduceLogSumExp', 'ReduceMax', 'ReduceMean', 'ReduceMin',
    'ReduceProd', 'ReduceSum', 'ReduceSumSquare', 'RegexFullMatch', 'Relu', 'Reshape', 'Resize',
    'ReverseSequence', 'RoiAlign', 'RotaryEmbedding', 'Round', 'STFT', 'Scale', 'ScaledTanh',
    'Scan', 'Scatter', 'ScatterElements', 'ScatterND', 'Selu', 'SequenceAt', 'SequenceConstruct',
    'SequenceEmpty', 'SequenceErase', 'SequenceInsert', 'SequenceLength', 'Shape', 'Shrink',
    'Sigmoid', 'Sign', 'SimplifiedLayerNormalization', 'Sin', 'Sinh', 'Size', 'Slice', 'Softmax',
    'Softplus', 'Softsign', 'SpaceToDepth', 'Split', 'SplitToSequence', 'Sqrt', 'Squeeze',
    'StringConcat', 'StringNormalizer', 'StringSplit', 'Sub', 'Sum', 'Tan', 'Tanh', 'TensorScatter',
    'TfIdfVectorizer', 'ThresholdedRelu', 'Tile', 'TopK', 'Transpose', 'Trilu', 'Unique',
    'Unsqueeze', 'Upsample', 'Where', 'Xor'
))

CONTRIB_OPS = frozenset((  # domain com.microsoft
    "FusedMatMul", "QuickGelu",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat",  # export --compute int8 (stock CPU builds since 1.6/1.7)
))


def is_stock(domain: str, op_type: str) -> bool:
    if domain in ("", "ai.onnx"):
        return op_type in STANDARD_OPS
    return domain == "com.microsoft" and op_type in CONTRIB_OPS
