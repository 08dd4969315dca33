# Shared start-up for the sbatch scripts in this folder (sourced, not run).
#
# Every check here runs in the batch shell BEFORE any `srun`: a bad variable ends the job at once
# with one line `error: ... ` (what to change) and exit code 2, before any GPU time is spent.
#
#   sphinx_require NAME HINT  NAME must be set (HINT: what to set it to)
#   sphinx_check_numbers KIND NAME...   each NAME that is set is a number of KIND (see there)
#   sphinx_check_switches NAME...       each NAME that is set is 0 or 1
#   sphinx_find_repo          REPO: the checkout (REPO, else the submit dir, else the script's)
#   sphinx_python_env         PY / CONTAINER_ARGS / PYTHONPATH; checks the venv or container
#   sphinx_cluster_env        NCCL / CUDA / threading settings Megatron-Core recommends
#   sphinx_world              WORLD, NNODES, TASKS_PER_NODE from Slurm (checked)
#   sphinx_train_args         TRAIN_ARGS (the `python -m megatron_sphinx.train` command line)
#   sphinx_master             MASTER_ADDR (first node) / MASTER_PORT (20000 + job id and restart)
#   sphinx_run_step CMD...    runs an srun step in the background, forwards a stop signal
#                             (USR1) to it, waits, and sets STEP_RC and STOP_REQUESTED
#   sphinx_maybe_requeue      requeues the job after a stop (exit code 3) or exits with STEP_RC

# Exit code of a training run that saved after a stop request (megatron_sphinx.train.loop).
SPHINX_EXIT_REQUEUE=3

sphinx_die() {
    echo "error: $*" >&2
    exit 2
}

sphinx_log() {
    echo "[$(date +%H:%M:%S) ${SLURM_JOB_NAME:-sphinx}] $*"
}

_sphinx_is_uint() { [[ "$1" =~ ^(0|[1-9][0-9]*)$ ]]; }  # no leading zeros: bash reads 010 as 8
# A number >= 0 as Python's float() reads it: 2, 0.5, .5, 1e-4 (no sign, inf or nan).
_sphinx_is_number() { [[ "$1" =~ ^([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][-+]?[0-9]+)?$ ]]; }

sphinx_require() {
    [ -n "${!1:-}" ] || sphinx_die "$1 is not set: $2"
}

# The one check of numeric variables, so every script words it the same: each NAME that is set
# and not empty must be of KIND, else `error: NAME=VALUE must be ...` and exit 2. An empty or
# unset NAME is left alone (the script's default applies). KIND is one of
#   count     an integer >= 1 (written without leading zeros, as for whole)
#   whole     an integer >= 0
#   positive  a number > 0 (2, 0.5, 1e-4)
#   number    a number >= 0
sphinx_check_numbers() {
    local kind=$1 name value what
    shift
    case "$kind" in
        count) what="a positive integer" ;;
        whole) what="an integer >= 0" ;;
        positive) what="a positive number, e.g. 2, 0.5 or 1e-4" ;;
        number) what="a number >= 0, e.g. 0, 0.5 or 1e-4" ;;
        *) sphinx_die "sphinx_check_numbers: unknown kind '$kind'" ;;
    esac
    for name in "$@"; do
        value=${!name-}
        [ -n "$value" ] || continue
        case "$kind" in
            count) _sphinx_is_uint "$value" && [ "$value" != 0 ] ;;
            whole) _sphinx_is_uint "$value" ;;
            positive)
                _sphinx_is_number "$value" && awk -v v="$value" 'BEGIN { exit !(v + 0 > 0) }' ;;
            number) _sphinx_is_number "$value" ;;
        esac || sphinx_die "$name=$value must be $what (or leave it unset for the default)"
    done
}

# Each NAME that is set and not empty must be 0 or 1 (a switch; unset means 0).
sphinx_check_switches() {
    local name
    for name in "$@"; do
        case "${!name-}" in
            "" | 0 | 1) ;;
            *) sphinx_die "${name}=${!name} must be 0 or 1 (1 turns it on; unset means 0)" ;;
        esac
    done
}

# Absolute path of $1 (relative paths are taken from the submit directory).
_sphinx_abspath() {
    case "$1" in
        /*) echo "$1" ;;
        *) echo "${SLURM_SUBMIT_DIR:-$PWD}/$1" ;;
    esac
}

sphinx_find_repo() {
    [ -n "${SLURM_JOB_ID:-}" ] \
        || sphinx_die "not inside a Slurm job: submit this script with sbatch (see docs/SLURM.md)"
    if [ -z "${REPO:-}" ]; then
        if [ -f "${SLURM_SUBMIT_DIR:-}/slurm/common.sh" ]; then
            REPO=$SLURM_SUBMIT_DIR
        else
            # sbatch runs a spooled copy of the script; its original path is the job's Command.
            local cmd
            cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' \
                | cut -d= -f2-)
            [ -n "$cmd" ] && REPO=$(cd "$(dirname "$cmd")/.." 2>/dev/null && pwd)
        fi
    fi
    [ -n "${REPO:-}" ] && [ -d "$REPO/megatron_sphinx" ] \
        || sphinx_die "REPO=${REPO:-} is not a megatron_sphinx checkout:" \
               "submit from the repository root or set REPO=/path/to/megatron_sphinx"
    export REPO
}

# PY: the interpreter inside the job; CONTAINER_ARGS: pyxis flags for srun (maybe empty).
sphinx_python_env() {
    CONTAINER_ARGS=()
    if [ -n "${CONTAINER_IMAGE:-}" ]; then
        # pyxis/enroot: the image brings Python and the libraries; the checkout is mounted.
        srun --help 2>/dev/null | grep -q -- '--container-image' \
            || sphinx_die "CONTAINER_IMAGE is set but this srun has no --container-image (pyxis" \
                   "is not installed): unset CONTAINER_IMAGE and use VENV"
        local mounts="$REPO:$REPO"
        [ -n "${CONTAINER_MOUNTS:-}" ] && mounts="$mounts,$CONTAINER_MOUNTS"
        CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
                        --container-workdir="$REPO" --no-container-mount-home)
        PY=${PYTHON:-python}
    else
        VENV=${VENV:-$REPO/.venv}
        PY=${PYTHON:-$VENV/bin/python}
        [ -x "$PY" ] \
            || sphinx_die "no Python at $PY: create the venv with 'bash scripts/setup.sh', or" \
                   "set VENV=/path/to/venv, PYTHON=..., or CONTAINER_IMAGE=..."
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
}

sphinx_cluster_env() {
    # Megatron-Core: one hardware queue per device so TP/SP communication kernels are scheduled
    # in issue order and overlap with compute as intended (required for sequence parallelism).
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # A failed or timed-out NCCL collective tears the process down instead of hanging (the
    # collective timeout is --timeout-minutes): a dead rank ends the job.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
    # Free the memory of async collectives' tensors when they complete, not via record_stream.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # NVLink SHARP buffers cost GPU memory and gain little for Megatron's TP groups.
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Fabric-specific (leave unset unless your cluster documents them): NCCL_SOCKET_IFNAME,
    # NCCL_IB_HCA, NCCL_IB_TIMEOUT, NCCL_IB_SL, NCCL_NET_GDR_LEVEL.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1
    # Nothing may reach the internet at run time.
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
}

# WORLD (training ranks), NNODES, TASKS_PER_NODE (ranks per node), GPUS_PER_NODE (maybe
# empty). With an argument (torchrun: that many ranks per node) the Slurm tasks are not counted.
sphinx_world() {
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    if [ -n "${1:-}" ]; then
        _sphinx_is_uint "$1" && [ "$1" != 0 ] \
            || sphinx_die "NPROC_PER_NODE=$1 must be a positive integer:" \
                   "the ranks torchrun starts per node, one per GPU"
        TASKS_PER_NODE=$1
        WORLD=$((NNODES * TASKS_PER_NODE))
    else
        WORLD=${SLURM_NTASKS:-}
        _sphinx_is_uint "$WORLD" && [ "$WORLD" -ge 1 ] \
            || sphinx_die "SLURM_NTASKS is not set:" \
                   "submit with --ntasks-per-node (one task per GPU) or --ntasks"
        TASKS_PER_NODE=$((WORLD / NNODES))
        [ $((TASKS_PER_NODE * NNODES)) -eq "$WORLD" ] \
            || sphinx_die "$WORLD tasks do not split evenly over $NNODES nodes:" \
                   "use --ntasks-per-node instead of --ntasks"
    fi
    GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-}
    if [ -n "$GPUS_PER_NODE" ] && [ "$GPUS_PER_NODE" != 0 ] \
        && [ "$TASKS_PER_NODE" -gt "$GPUS_PER_NODE" ]; then
        sphinx_die "$TASKS_PER_NODE ranks per node but only $GPUS_PER_NODE GPUs per node:" \
            "start one rank per GPU (--ntasks-per-node, or NPROC_PER_NODE for torchrun, equal to --gpus-per-node)"
    fi
}

# Every numeric variable and switch of the training scripts, before anything uses one (also
# those only sphinx_run_step and sphinx_maybe_requeue read: a bad MAX_RESTARTS would otherwise
# surface only after a stop, as a requeue without limit).
_sphinx_check_train_numbers() {
    sphinx_check_numbers count TP PP VPP EP STEPS LOG_INTERVAL GLOBAL_BATCH_SIZE SEQ_LENGTH
    sphinx_check_numbers whole SAVE_INTERVAL KEEP_LAST EXIT_INTERVAL SEED MAX_RESTARTS \
        STOP_REPEAT_S STEP_WAIT_S
    sphinx_check_numbers positive TIMEOUT_MINUTES EXIT_AFTER_MINUTES
    sphinx_check_numbers number LR
    sphinx_check_switches SP
}

# Checks the layout against WORLD (Megatron-Core's rules, as megatron_sphinx.parallel_dims).
_sphinx_check_layout() {
    local mp=$((TP * PP))
    [ $((WORLD % mp)) -eq 0 ] \
        || sphinx_die "TP*PP = $TP*$PP = $mp does not divide the $WORLD ranks of this job:" \
               "start a multiple of $mp ranks (--nodes x ranks per node) or change TP/PP"
    local dp=$((WORLD / mp))
    [ $(((dp * TP) % (TP * EP))) -eq 0 ] \
        || sphinx_die "EP=$EP does not divide the data-parallel size $dp (world $WORLD / TP*PP" \
               "$mp): change EP or the task count"
    if [ "$SP" = 1 ] && [ "$TP" -lt 2 ]; then
        sphinx_die "SP=1 needs TP >= 2: set TP >= 2 or SP=0"
    fi
    if [ "$TP" -gt "$TASKS_PER_NODE" ]; then
        sphinx_log "warning: TP=$TP spans nodes ($TASKS_PER_NODE tasks per node):" \
            "tensor parallelism across nodes is slow"
    fi
}

# The model-level checks (recipe name, heads/layers vs TP/PP, batch vs DP) in Python: no torch
# import, well under a second. Skipped in containers (Python is only inside the image).
_sphinx_check_recipe() {
    [ -n "${CONTAINER_IMAGE:-}" ] && return 0
    local msg
    msg=$("$PY" - "$RECIPE" "$WORLD" "$TP" "$PP" "$EP" "$SP" "$GLOBAL_BATCH_SIZE" "$SEQ_LENGTH" \
          "$VPP" 2>&1 <<'EOF'
import sys

try:
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.parallel_dims import ParallelDims

    recipe, world, tp, pp, ep, sp, gbs, seq, vpp = sys.argv[1:]
    cfg = get_recipe(recipe)
    world, tp, pp, ep, vpp = int(world), int(tp), int(pp), int(ep), int(vpp)
    sp = sp == "1" or (cfg.llm.is_moe and tp > 1)
    gbs = int(gbs) if gbs else cfg.train.global_batch_size
    seq = int(seq) if seq else cfg.train.seq_length
    dims = ParallelDims(world_size=world, tp=tp, pp=pp, ep=ep, sequence_parallel=sp,
                        vpp=None if vpp == 1 else vpp)
    if gbs % dims.dp:
        raise ValueError(f"global batch {gbs} is not divisible by the data-parallel size "
                         f"{dims.dp}: change GLOBAL_BATCH_SIZE or the task count")
    dims.validate_model(num_layers=cfg.llm.num_layers, num_heads=cfg.llm.num_attention_heads,
                        num_kv_heads=cfg.llm.num_query_groups, num_experts=cfg.llm.num_experts,
                        seq_length=seq, num_microbatches=gbs // dims.dp, model_name=cfg.name)
except (ValueError, TypeError) as exc:
    print(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    sys.exit(2)
except Exception as exc:  # noqa: BLE001 - a broken environment, not a bad variable
    print(f"the environment cannot import megatron_sphinx ({type(exc).__name__}: {exc}): "
          "check VENV/PYTHON")
    sys.exit(3)
EOF
    ) || sphinx_die "${msg##*$'\n'}"
}

# TRAIN_ARGS from the variables (defaults here; docs/SLURM.md lists them).
sphinx_train_args() {
    RECIPE=${RECIPE:-debug}
    TP=${TP:-1}
    PP=${PP:-1}
    VPP=${VPP:-1}
    EP=${EP:-1}
    SP=${SP:-0}
    STEPS=${STEPS:-1000}
    DATA=${DATA:-}
    SAVE=${SAVE:-$REPO/runs/$RECIPE}
    LOAD=${LOAD:-}
    SAVE_INTERVAL=${SAVE_INTERVAL:-500}
    KEEP_LAST=${KEEP_LAST:-3}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-}
    SEQ_LENGTH=${SEQ_LENGTH:-}
    LR=${LR:-}
    SEED=${SEED:-}
    TIMEOUT_MINUTES=${TIMEOUT_MINUTES:-5}
    EXIT_AFTER_MINUTES=${EXIT_AFTER_MINUTES:-}
    EXIT_INTERVAL=${EXIT_INTERVAL:-}
    LOG_INTERVAL=${LOG_INTERVAL:-1}
    EXTRA_ARGS=${EXTRA_ARGS:-}

    _sphinx_check_train_numbers
    _sphinx_check_layout
    case "$DATA" in
        "" | synthetic) ;;
        *)
            DATA=$(_sphinx_abspath "$DATA")
            [ -e "$DATA" ] \
                || sphinx_die "DATA=$DATA does not exist:" \
                       "preprocess it first (slurm/preprocess.sbatch), or set DATA=synthetic, or leave DATA empty for the sample data"
            ;;
    esac
    SAVE=$(_sphinx_abspath "$SAVE")
    [ -e "$SAVE" ] && [ ! -d "$SAVE" ] && sphinx_die "SAVE=$SAVE is a file: set SAVE to a directory"
    if [ -n "$LOAD" ]; then
        LOAD=$(_sphinx_abspath "$LOAD")
        [ -e "$LOAD" ] || sphinx_die "LOAD=$LOAD does not exist:" \
                              "set LOAD to a checkpoint or a save directory, or leave it empty"
    fi
    _sphinx_check_recipe
    mkdir -p "$SAVE" 2>/dev/null || sphinx_die "SAVE=$SAVE cannot be created:" \
                                        "set SAVE to a writable directory on a file system every node sees"

    TRAIN_ARGS=(-m megatron_sphinx.train --recipe "$RECIPE" --tp "$TP" --pp "$PP" --vpp "$VPP"
                --ep "$EP"
                --steps "$STEPS" --save "$SAVE" --save-interval "$SAVE_INTERVAL"
                --keep-last "$KEEP_LAST" --timeout-minutes "$TIMEOUT_MINUTES"
                --log-interval "$LOG_INTERVAL")
    [ "$SP" = 1 ] && TRAIN_ARGS+=(--sp)
    [ -n "$DATA" ] && TRAIN_ARGS+=(--data "$DATA")
    [ -n "$LOAD" ] && TRAIN_ARGS+=(--load "$LOAD")
    [ -n "$GLOBAL_BATCH_SIZE" ] && TRAIN_ARGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE")
    [ -n "$SEQ_LENGTH" ] && TRAIN_ARGS+=(--seq-length "$SEQ_LENGTH")
    [ -n "$LR" ] && TRAIN_ARGS+=(--lr "$LR")
    [ -n "$SEED" ] && TRAIN_ARGS+=(--seed "$SEED")
    [ -n "$EXIT_AFTER_MINUTES" ] && TRAIN_ARGS+=(--exit-after-minutes "$EXIT_AFTER_MINUTES")
    [ -n "$EXIT_INTERVAL" ] && [ "$EXIT_INTERVAL" != 0 ] && TRAIN_ARGS+=(--exit-interval "$EXIT_INTERVAL")
    if [ -n "$EXTRA_ARGS" ]; then
        local extra
        read -r -a extra <<<"$EXTRA_ARGS"
        TRAIN_ARGS+=("${extra[@]}")
    fi
    return 0
}

# Rendezvous of rank 0: the job's first node, and a port derived from the job id and restart
# count (a requeued run does not meet the previous run's socket in TIME_WAIT).
sphinx_master() {
    if [ -z "${MASTER_ADDR:-}" ]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
        [ -n "$MASTER_ADDR" ] || MASTER_ADDR=$(hostname)
    fi
    MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 10 + ${SLURM_RESTART_COUNT:-0}) % 20000))}
    export MASTER_ADDR MASTER_PORT
}

# Put before the rank's command on the srun line: it starts with SIGUSR1 and SIGTERM ignored
# until the training loop installs its own handlers (megatron_sphinx.train.signals). Slurm signals
# every process of a step, and helpers a rank forks during start-up (Megatron's checkpoint-writer
# manager) would otherwise die of the stop signal and break the very save it asks for. A signal
# that arrives while a rank is still starting is repeated (STOP_REPEAT_S) until the step ends.
SPHINX_RANK_WRAPPER=(bash -c 'trap "" USR1 TERM; exec "$@"' sphinx-rank)

_sphinx_forward_stop() {
    STOP_REQUESTED=1
    [ -n "${STEP_PID:-}" ] || return 0
    sphinx_log "stop signal received:" \
        "forwarding SIGUSR1 to the training step (it saves and exits $SPHINX_EXIT_REQUEUE)"
    kill -USR1 "$STEP_PID" 2>/dev/null
    local repeat=${STOP_REPEAT_S:-30}
    if [ -z "${_SPHINX_TICKER:-}" ] && [ "$repeat" -gt 0 ]; then
        ( while sleep "$repeat"; do kill -USR1 "$STEP_PID" 2>/dev/null || exit 0; done ) &
        _SPHINX_TICKER=$!
    fi
    return 0
}

# Runs "$@" (an srun command) in the background so the batch shell can take USR1 (Slurm's
# --signal=B:USR1@T, or `scancel --signal=USR1 --batch`) and pass it on; srun forwards it to
# every task. Sets STEP_RC.
sphinx_run_step() {
    STOP_REQUESTED=${STOP_REQUESTED:-0}
    _SPHINX_TICKER=
    trap _sphinx_forward_stop USR1
    "$@" &
    STEP_PID=$!
    while :; do
        wait "$STEP_PID"
        STEP_RC=$?
        # `wait` also returns when a trapped signal arrives: keep waiting while the step lives.
        kill -0 "$STEP_PID" 2>/dev/null || break
    done
    trap - USR1
    [ -n "$_SPHINX_TICKER" ] && kill "$_SPHINX_TICKER" 2>/dev/null
    STEP_PID=
    return 0
}

# After the step: requeue when the run stopped to be resumed, else end with the step's code.
sphinx_maybe_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_RESTARTS:-100}
    local stopped=0
    [ "$STEP_RC" = "$SPHINX_EXIT_REQUEUE" ] && stopped=1
    # A stop signal that reached a rank before its handler was installed kills it instead; the
    # run still resumes from its newest complete checkpoint.
    [ "${STOP_REQUESTED:-0}" = 1 ] && [ "$STEP_RC" != 0 ] && stopped=1
    if [ "$stopped" = 1 ]; then
        if [ "$restarts" -ge "$max" ]; then
            sphinx_log "the step stopped on request (exit $STEP_RC) but the job already" \
                "restarted $restarts times (MAX_RESTARTS=$max): not requeueing"
            exit "$STEP_RC"
        fi
        sphinx_log "the step stopped on request (exit $STEP_RC): requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from $SAVE"
        if scontrol requeue "$SLURM_JOB_ID"; then
            # Slurm now ends this run of the job and queues it again; it resumes from SAVE.
            sleep 60
            exit 0
        fi
        sphinx_log "scontrol requeue failed: resubmit the same command to resume from SAVE"
        exit "$STEP_RC"
    fi
    if [ "$STEP_RC" = 0 ]; then
        sphinx_log "finished"
    else
        sphinx_log "training step failed with exit code $STEP_RC:" \
            "resubmit to resume from the newest complete checkpoint in SAVE"
    fi
    exit "$STEP_RC"
}
