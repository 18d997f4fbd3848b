# Sourced by the MPS probe scripts (mps_decode_1gpu.sh, mps_graph_1gpu.sh, partition_check_1gpu.sh):
# starts a CUDA MPS control daemon through tandem_cli.mps (a private pipe/log directory) and
# defines `mps_client PCT CMD...` (CMD as an MPS client limited to PCT% of the SMs) and
# `mps_quit`. Exits the script when MPS does not start.
MPS_ENVS=$(python3 -c "
import json; from tandem_cli.mps import start_mps
d = start_mps(say=print); print('ENV', json.dumps(d.env()))" | tee /dev/stderr | sed -n 's/^ENV //p')
[ -z "$MPS_ENVS" ] && { echo "MPS did not start"; exit 1; }
MPS_PIPE=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['CUDA_MPS_PIPE_DIRECTORY'])" "$MPS_ENVS")
MPS_LOG=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['CUDA_MPS_LOG_DIRECTORY'])" "$MPS_ENVS")
mps_client() {  # PCT CMD...
    local pct=$1; shift
    CUDA_MPS_PIPE_DIRECTORY="$MPS_PIPE" CUDA_MPS_LOG_DIRECTORY="$MPS_LOG" CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="$pct" "$@"
}
mps_quit() {
    echo quit | CUDA_MPS_PIPE_DIRECTORY="$MPS_PIPE" CUDA_MPS_LOG_DIRECTORY="$MPS_LOG" nvidia-cuda-mps-control
}
