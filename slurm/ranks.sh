# Sourced by the sbatch templates beside it (not run alone): check that the allocation fits the
# engine, then start one rank per Slurm task. Ranks fill nodes in order (rank = pp_stage * tp +
# tp_rank), so with tasks-per-node = tp each pipeline stage has a node and all-reduces stay in it.

# run_ranks COMMAND ENGINE [ARGS...]: `srun dist-runtime COMMAND ENGINE --device D ARGS...`
run_ranks() {
    local command=$1
    if [ $# -lt 2 ]; then
        echo "error: give the engine folder: sbatch slurm/$command.sbatch ENGINE [ARGS...]" >&2
        exit 2
    fi
    local engine=$2 device
    shift 2
    # Fails here, before any rank starts, when tasks != tp x pp; prints the device ranks use. Jobs
    # inherit the submitting shell's environment, so `python3` is dist-runtime's when its venv is active.
    device=$(python3 - "$engine" <<'PY'
import itertools, json, os, sys
try:
    from launch.rank_info import tasks_per_node
except ImportError:
    sys.exit("error: the python3 on PATH has no dist-runtime: activate its environment before sbatch")

engine = sys.argv[1]
try:
    with open(os.path.join(engine, "engine.json")) as f:
        plan = json.load(f)["plan"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"error: {engine} is not a readable engine folder ({e})")
tp, pp = plan["tp"], plan["pp"]
per_node = tasks_per_node(os.environ["SLURM_TASKS_PER_NODE"])
tasks = sum(per_node)
if tasks != tp * pp:
    layouts = f"--nodes=1 --ntasks-per-node={tp * pp}" + (f", or --nodes={pp} --ntasks-per-node={tp}" if pp > 1 else "")
    sys.exit(f"error: engine {engine} needs {tp * pp} ranks (tp={tp} x pp={pp}); this allocation has {tasks} "
             f"tasks (per node: {os.environ['SLURM_TASKS_PER_NODE']}). Ask for nodes x tasks-per-node = {tp * pp}: "
             f"sbatch {layouts}")
if any(boundary % tp for boundary in list(itertools.accumulate(per_node))[:-1]):
    print(f"note: tp={tp} groups straddle nodes (tasks per node: {per_node}); their all-reduces cross the network",
          file=sys.stderr)
gpus = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0)
if gpus and gpus < max(per_node):
    sys.exit(f"error: {max(per_node)} ranks on a node but {gpus} GPUs there: ask for --gpus-per-node={max(per_node)}")
print("cuda" if gpus else "cpu")
print(f"dist-runtime: {tasks} ranks, tp={tp} x pp={pp}, {per_node} per node, on {'GPUs' if gpus else 'CPUs'}",
      file=sys.stderr)
PY
) || exit 1
    # Ranks admit one another only on proof of a secret that srun hands every task in its environment:
    # a fresh one per job, made here rather than at submission so that it is stored nowhere. Export
    # DIST_RUNTIME_JOB_SECRET, or DIST_RUNTIME_JOB_SECRET_FILE (a file only you can read), to choose it.
    if [ -z "${DIST_RUNTIME_JOB_SECRET:-}" ] && [ -z "${DIST_RUNTIME_JOB_SECRET_FILE:-}" ]; then
        DIST_RUNTIME_JOB_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))') || exit 1
        export DIST_RUNTIME_JOB_SECRET
    fi
    # --mpi=none: ranks meet over our own TCP rendezvous whatever the cluster's MpiDefault;
    # --kill-on-bad-exit: a rank that fails ends the step instead of leaving the others waiting.
    srun --mpi=none --kill-on-bad-exit=1 --distribution=block dist-runtime "$command" "$engine" \
        --device "$device" "$@"
}
