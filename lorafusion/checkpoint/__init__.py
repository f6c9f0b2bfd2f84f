"""Run checkpoints: everything a fit needs to go on where it stopped, written, found, checked and read here only.

The format (docs/checkpoints.md says the same for users; tests/lorafusion/test_checkpoint_format.py checks both
against a real checkpoint):

    <output_dir>/
        run.json                                  the run's settings: RunConfig and every JobSpec (record.py)
        checkpoints/
            step-<N>/                             one complete checkpoint, N = optimizer steps of all jobs, summed
                manifest.json                     written last: what makes the folder a checkpoint
                jobs/<job>/driver.json            the driver's progress of the job and the checks of its position
                jobs/<job>/stage-<s>.safetensors  pipeline stage s's tensors of the job and their optimizer state
            .step-<N>.partial/                    being written, or left by a crash: never read, pruned
            .step-<N>.old/                        a complete one moved aside while step N is saved again

- manifest.json: {"format": "lorafusion-checkpoint/2", "step": N, "windows": the driver's windows completed,
  "config": run.json's record when it was taken, "jobs": {job: {"status": "active" | "finished" | "failed",
  "stages": its shard count (0 when failed)}}, "files": {path: {"bytes", "sha256"}} of every other file,
  "stream" (only when run.balance_pipeline chose a microbatch capacity): {"capacity_tokens", "jobs", "layout"},
  "federation_rounds" (only when the run has federated groups): {group: step count of its last aggregated round}}.
- driver.json: {"job", "status", "step", "total_steps", "tokens", "last_loss", "eval_loss", "error", "position":
  {"next_lr", "num_samples", "data_sha256", "next_sample_indices", "next_dropout_seeds"}}: the job's progress, and
  what this run must reproduce at its next step for a resume to be exact.
- stage-<s>.safetensors: "param/<name>" (the job's tensors that stage holds, named by global layer, so a resume may
  use another number of stages) and "optim/<name>/<key>" (their optimizer state); metadata {"format":
  "lorafusion-stage-shard/1", "job", "stage", "step_count", "params": JSON list of the names}. A failed job has none.

Step. Jobs step at their own rates, so N is the sum of every job's optimizer steps: with one job, its step; with
several, the total of the progress lines' steps ("sql 3/10, chat 5/10" → step-00000008), the "N job steps already
done" a resume reports. It never decreases, so it orders the checkpoints; one saved again at the same N (the end
right after a periodic save) holds the same steps and replaces the earlier.

Commit protocol (files.finalize_checkpoint): (1) fill `.step-<N>.partial/`, each file under a temporary name,
fsynced and renamed; (2) the manifest last, with every file's size and sha256, the same way, then every folder of
the staging fsynced; (3) rename it to `step-<N>` (an existing `step-<N>` is first renamed to `.step-<N>.old` and
deleted only after the new one is in place) and fsync `checkpoints/`; (4) only then prune to run.keep_checkpoints,
deleting each folder's manifest first. A crash at any moment leaves every earlier complete checkpoint as it was.

Resume (resume.open_checkpoint). The latest is the complete folder with the largest N (one an older lorafusion
wrote counts as older than every other); its files are verified against the manifest, its "config" against this run's settings (only
record.RESUME_FREE_RUN_FIELDS may change), and each job's position against its data; a damaged one is an error
naming the file, resolved by deleting that folder (the previous one is then used). Each job's metrics.jsonl is cut
back to the checkpoint's step. A run saved by an older lorafusion: format 1 named folders by the window counter
and stored it as "step"; it is read as "windows", and such folders sort before every newer one; a field missing
from an older settings record reads as its default, and missing "federation_rounds" are derived from the clients'
steps (runtime/federation.py).

A user may delete any checkpoint folder, or copy a whole output_dir and resume it under another path; a file
edited inside a checkpoint is refused.
"""

from lorafusion.checkpoint.durable import atomic_directory, atomic_file, atomic_write_text, fsync_path
from lorafusion.checkpoint.files import (
    CHECKPOINT_MANIFEST, CHECKPOINTS_DIR, begin_checkpoint, checkpoint_dir, complete_checkpoints, finalize_checkpoint,
    latest_checkpoint, prune_checkpoints, read_driver_state, read_manifest, read_stage_state, write_driver_state,
    write_stage_shard,
)
from lorafusion.checkpoint.record import (
    RESUME_FREE_RUN_FIELDS, RUN_MANIFEST, check_output_dir, config_differences, read_run_manifest, run_manifest,
    write_run_manifest,
)
from lorafusion.checkpoint.resume import (
    JobProgress, JobStates, Resumed, StreamState, checkpoint_step, commit_checkpoint, open_checkpoint,
    restore_worker, stage_states, trim_metrics,
)

__all__ = [
    "atomic_directory", "atomic_file", "atomic_write_text", "fsync_path",
    "CHECKPOINT_MANIFEST", "CHECKPOINTS_DIR", "begin_checkpoint", "checkpoint_dir", "complete_checkpoints",
    "finalize_checkpoint", "latest_checkpoint", "prune_checkpoints", "read_driver_state", "read_manifest",
    "read_stage_state", "write_driver_state", "write_stage_shard",
    "RESUME_FREE_RUN_FIELDS", "RUN_MANIFEST", "check_output_dir", "config_differences", "read_run_manifest",
    "run_manifest", "write_run_manifest",
    "JobProgress", "JobStates", "Resumed", "StreamState", "checkpoint_step", "commit_checkpoint",
    "open_checkpoint", "restore_worker", "stage_states", "trim_metrics",
]
