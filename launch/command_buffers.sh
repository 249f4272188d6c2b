# Sourced by launch/gpu.sh and launch/gpu_check.sh: the XLA flags of the command-buffer
# route for lax.switch's conditionals (README, "Performance").
#
# Each XLA conditional reads its branch index on the host (conditional_thunk.cc) and stalls
# the stream. With CONDITIONAL (and WHILE) command types, a conditional whose branches can
# all be captured becomes a CUDA-graph conditional node, with no host read; convolutions
# are capturable only as CONVOLUTION commands, or as fusions with conv fusion on.
# graph_min_graph_size=1 captures every such sequence, however short. All names are in the
# pinned CUDA plugin (jax-cuda12-pjrt 0.10.2: xla_gpu_enable_command_buffer, its types
# FUSION, CUBLAS, CUDNN, COLLECTIVES, CONDITIONAL, WHILE, CUSTOM_CALL, CUBLASLT,
# DYNAMIC_SLICE_FUSION, CONVOLUTION; xla_gpu_experimental_enable_conv_fusion;
# xla_gpu_graph_min_graph_size). '+TYPE' adds to XLA's default types.
COMMAND_BUFFER_XLA_FLAGS="--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE,+CONVOLUTION --xla_gpu_graph_min_graph_size=1"
