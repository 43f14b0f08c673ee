export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
timeout 200 python .diag/loop_trace.py xla detjax --trace > $OUT/loop_default.txt 2>&1; echo rc $?
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python .diag/loop_trace.py xla detjax > $OUT/loop_nocb.txt 2>&1; echo rc $?
XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 timeout 150 python .diag/loop_trace.py xla detjax > $OUT/loop_mingraph1.txt 2>&1; echo rc $?
for f in $OUT/loop_*.txt; do echo "== $f"; grep -v "^W1\|^I1\|cuda_timer" $f | tail -40; done
