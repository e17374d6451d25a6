"""`make mutations`: do the fast tests catch the method's bugs? Each mutation below is a bug
someone made or could make; it is applied alone to a temporary copy of the repository and its
fast tests are run there. A mutation the tests do not fail on has survived: a test is missing.

  python benchmarks/mutations.py                  # every mutation, then the total time
  python benchmarks/mutations.py --only knn_k1    # some of them (repeatable)
  python benchmarks/mutations.py --jobs 4         # four at once, each in its own copy
  python benchmarks/mutations.py --list

Prints `caught`, `survived` or `error` per mutation and exits 1 unless every one is caught. An
original snippet that is not found exactly once in its file is an error, never a skip: update
the snippet when the code it mutates moves.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("raysd", "tests", "search_spaces", "pyproject.toml")
TIMEOUT_S = 600  # per pytest run: the fast selections take under a minute on 2 idle cores


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # pytest node ids that must fail; () = no fast test yet (survives)


# Add to this list whenever a bug is found.
MUTATIONS = [
    # --- the method (stages.py, losses.py) ---
    Mutation("lambda_on_distill", "raysd/objectives.py",
             'return lam * mae + match,', 'return mae + lam * match,',
             ("tests/test_recipe.py::test_lambda_weights_the_mae_term_not_the_distillation_term",)),
    Mutation("student_from_teacher", "raysd/stages.py",
             "student = copy.deepcopy(init)",
             "student = copy.deepcopy(init); student.load_state_dict(teacher_weights)",
             ("tests/test_recipe.py::test_every_round_restarts_from_theta_init",)),
    Mutation("teacher_train_mode", "raysd/stages.py",
             "teacher.to(hooks.device).eval()", "teacher.to(hooks.device)",
             ("tests/test_recipe.py::test_the_teacher_runs_in_eval_mode_so_its_dropout_is_off",)),
    Mutation("test_metrics_on_val", "raysd/stages.py",
             '("test", task.test)', '("test", task.val)',
             ("tests/test_recipe.py::test_each_split_is_evaluated_on_its_own_data",)),
    Mutation("unseeded_head", "raysd/stages.py",
             'torch.manual_seed(_seed(cfg.seed, "head"))', "pass",
             ("tests/test_recipe.py::test_the_classification_head_does_not_depend_on_the_global_random_state",)),
    Mutation("knn_k1", "raysd/stages.py",
             "k: int = 20,", "k: int = 1,",
             ("tests/test_artifacts.py::test_knn_signal_votes_with_the_20_nearest_neighbours",)),
    Mutation("distill_mean_over_dims", "raysd/losses.py",
             ".pow(2).sum(dim=-1).mean()", ".pow(2).mean()",
             ("tests/test_losses.py::test_distill_loss_is_batch_mean_of_squared_l2",)),
    Mutation("distill_without_stopgrad", "raysd/losses.py",
             "(student - teacher.detach())", "(student - teacher)",
             ("tests/test_losses.py::test_distill_loss_zero_with_zero_gradient_when_student_equals_teacher",)),
    Mutation("mae_loss_on_every_patch", "raysd/losses.py",
             "return (per_patch * mask).sum() / mask.sum()", "return per_patch.mean()",
             ("tests/test_losses.py::test_mae_loss_ignores_predictions_on_visible_patches",)),
    Mutation("mae_targets_not_normalised", "raysd/losses.py",
             "target = (target - mean) / (var + 1e-6) ** 0.5", "target = target",
             ("tests/test_losses.py::test_mae_loss_targets_are_normalised_per_patch",)),
    Mutation("gamma_as_visible_share", "raysd/losses.py",
             "round(num_patches * (1.0 - mask_ratio))", "round(num_patches * mask_ratio)",
             ("tests/test_losses.py::test_mask_keeps_exactly_round_k_times_one_minus_gamma_visible",)),
    Mutation("decoder_moves_at_lambda_0", "raysd/stages.py",
             "student.decoder.requires_grad_(False)", "pass",
             ("tests/test_recipe.py::test_zero_mae_weight_round_runs_under_ddp",)),
    Mutation("no_nan_guard", "raysd/stages.py",
             "if not math.isfinite(summed):", "if False:",
             ("tests/test_recipe.py::test_divergence_is_caught_with_stage_and_step",)),
    Mutation("encoder_sees_masked_patches", "raysd/models/vit.py",
             "if ids_keep is not None:", "if False:",
             ("tests/test_models.py::test_encoder_sees_only_visible_patches_during_mae",)),
    # --- the baselines and ablations (regularisers.py, objectives.py, issue 20) ---
    Mutation("recadam_pull_not_annealed", "raysd/regularisers.py",
             'alpha=-group["lr"] * (1 - lam) * group["coef"]', 'alpha=-group["lr"] * group["coef"]',
             ("tests/test_regularisers.py::test_recadam_update_matches_its_formula_step_by_step",)),
    Mutation("recadam_no_bias_correction", "raysd/regularisers.py",
             'step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)',
             'step_size = group["lr"]',
             ("tests/test_regularisers.py::test_recadam_update_matches_its_formula_step_by_step",)),
    Mutation("mars_scales_the_whole_matrix", "raysd/regularisers.py",
             "scale = (diff.abs().sum(dim=1, keepdim=True) / radius).clamp(min=1.0)",
             "scale = (diff.abs().sum(dim=1, keepdim=True).max() / radius).clamp(min=1.0)",
             ("tests/test_regularisers.py::test_mars_projection_lands_on_the_ball_row_by_row",)),
    Mutation("mars_pushes_inner_rows_out", "raysd/regularisers.py",
             "/ radius).clamp(min=1.0)", "/ radius)",
             ("tests/test_regularisers.py::test_mars_projection_lands_on_the_ball_row_by_row",)),
    Mutation("r3f_one_sided_kl", "raysd/regularisers.py",
             " + (log_q.exp() * (log_q - log_p)).sum(-1)", "",
             ("tests/test_regularisers.py::test_symmetric_kl_is_both_directions_of_kl_batch_mean",
              "tests/test_regularisers.py::test_r3f_step_loss_is_ce_plus_lambda_times_symmetric_kl_of_one_noise_draw")),
    Mutation("r3f_noise_not_detached", "raysd/regularisers.py",
             "embeddings.detach() + noise", "embeddings + noise",
             ("tests/test_regularisers.py::test_r3f_noise_doubles_the_batch_with_a_detached_noised_copy",)),
    Mutation("prediction_target_on_another_mask", "raysd/objectives.py",
             "target = teacher.predict(batch, masking)",
             "target = teacher.predict(batch, student.draw_masking(batch, gamma))",
             ("tests/test_regularisers.py::test_vit_prediction_matching_targets_the_teachers_reconstruction_of_the_same_masked_input",)),
    Mutation("token_kl_reversed", "raysd/losses.py",
             "per_token = (log_t.exp() * (log_t - log_s)).sum(-1)",
             "per_token = (log_s.exp() * (log_s - log_t)).sum(-1)",
             ("tests/test_regularisers.py::test_roberta_prediction_matching_is_kl_teacher_to_student_over_masked_tokens",)),
    Mutation("weight_l2_not_squared", "raysd/regularisers.py",
             "(param.float() - teacher[prefix + name].float()).pow(2).sum()",
             "(param.float() - teacher[prefix + name].float()).abs().sum()",
             ("tests/test_regularisers.py::test_weight_distances_match_a_direct_computation",)),
    Mutation("mars_norm_sums_rows", "raysd/regularisers.py",
             "return rows(diff).abs().sum(dim=1).max()", "return rows(diff).abs().sum()",
             ("tests/test_regularisers.py::test_weight_distances_match_a_direct_computation",)),
    Mutation("further_pretrain_2x_not_doubled", "raysd/config.py",
             "steps=2 * fp.steps", "steps=fp.steps",
             ("tests/test_regularisers.py::test_ablations_share_the_stages_they_compute_alike_and_only_those",)),
    Mutation("target_not_keyed", "raysd/config.py",
             'one_of(*TARGETS), changes=("self_distill",),', "one_of(*TARGETS), changes=NOTHING,",
             ("tests/test_regularisers.py::test_ablations_share_the_stages_they_compute_alike_and_only_those",)),
    # --- fine-tuning as the reference does it ---
    Mutation("position_embeddings_frozen", "raysd/stages.py",
             "classifier.backbone.encoder.requires_grad_(True)", "pass",
             ("tests/test_recipe.py::test_finetuning_trains_position_embeddings_with_hidden_dropout_where_the_reference_has_it",)),
    Mutation("dropout_after_gelu", "raysd/stages.py",
             'HIDDEN_DROPOUT = ("pos_drop", "proj_drop", "drop2",',
             'HIDDEN_DROPOUT = ("pos_drop", "proj_drop", "drop1", "drop2",',
             ("tests/test_recipe.py::test_finetuning_trains_position_embeddings_with_hidden_dropout_where_the_reference_has_it",)),
    Mutation("embedding_dropout_skipped", "raysd/models/vit.py",
             "x = enc.norm_pre(enc.pos_drop(torch.cat([cls, x], dim=1)))",
             "x = enc.norm_pre(torch.cat([cls, x], dim=1))",
             ("tests/test_recipe.py::test_the_embedding_dropout_is_applied",)),
    Mutation("finetune_exempts_norms", "raysd/stages.py",
             "skip = any(part in name for part in FINETUNE_NO_DECAY)",
             "skip = param.ndim <= 1 or any(part in name for part in FINETUNE_NO_DECAY)",
             ("tests/test_recipe.py::test_weight_decay_exemptions_follow_the_reference",)),
    Mutation("pretrain_decays_norms", "raysd/stages.py",
             'skip = param.ndim <= 1 or name.endswith(".bias")', "skip = False",
             ("tests/test_recipe.py::test_weight_decay_exemptions_follow_the_reference",)),
    Mutation("head_init_kaiming", "raysd/models/__init__.py",
             "nn.init.trunc_normal_(self.head.weight, std=0.02)", "self.head.reset_parameters()",
             ("tests/test_recipe.py::test_the_head_is_initialised_as_the_reference",)),
    Mutation("squash_crops", "raysd/data/images.py",
             "plain = transforms.Resize((size, size))", "plain = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])",
             ("tests/test_image_cache.py::test_squash_resizes_both_sides_as_the_reference_does",)),
    # --- the trial (recipe.py) and stage reuse (artifacts.py) ---
    Mutation("finetune_from_theta_init", "raysd/recipe.py",
             "finetune_and_evaluate(init, state.theta or init.state_dict(),",
             "finetune_and_evaluate(init, init.state_dict(),",
             ("tests/test_recipe.py::test_fine_tuning_starts_from_the_methods_weights",)),
    # Keys follow the schema's declarations (raysd/config.py): a setting declared unable to
    # change a stage drops out of that stage's key.
    Mutation("key_without_gamma", "raysd/config.py",
             'changes=PRETRAIN, doc="gamma"', 'changes=NOTHING, doc="gamma"',
             ("tests/test_artifacts.py::test_keys_change_with_every_input_that_changes_the_weights",)),
    Mutation("key_without_lambda", "raysd/config.py",
             'changes=("self_distill",), doc="lambda"', 'changes=NOTHING, doc="lambda"',
             ("tests/test_artifacts.py::test_keys_change_with_every_input_that_changes_the_weights",)),
    Mutation("key_without_val_fraction", "raysd/config.py",
             "setting(0.1, number(0, 1), changes=EVERYTHING,",
             "setting(0.1, number(0, 1), changes=NOTHING,",
             ("tests/test_artifacts.py::test_keys_change_with_every_input_that_changes_the_weights",
              "tests/test_schema.py::test_val_fraction_changes_every_stage_and_numbers_key_alike")),
    Mutation("key_ignores_declarations", "raysd/schema.py",
             "if output not in item.changes:", "if output not in item.changes and False:",
             ("tests/test_artifacts.py::test_settings_that_cannot_change_the_weights_leave_every_key_alone",
              "tests/test_schema.py::test_key_inputs_follow_the_declarations_exactly")),
    Mutation("numbers_not_coerced", "raysd/schema.py",
             "    return Rule(ok, what, float)", "    return Rule(ok, what)",
             ("tests/test_schema.py::test_parse_names_the_dotted_key_and_rule",)),
    Mutation("key_numbers_not_normalised", "raysd/schema.py",
             "        return float(value)", "        return value",
             ("tests/test_schema.py::test_val_fraction_changes_every_stage_and_numbers_key_alike",)),
    Mutation("lease_always_grants", "raysd/leases.py",
             'if record["owner"] != self.owner:', "if False:",
             ("tests/test_artifacts.py::test_lease_one_builder_others_wait_and_a_dead_builders_lease_expires",)),
    # --- one builder per artifact (leases.py): each check alone must be caught ---
    Mutation("local_create_check_then_link", "raysd/leases.py",
             "            os.link(tmp, path)\n", "            os.path.exists(path) or os.link(tmp, path)\n",
             ("tests/test_leases.py::test_two_claimants_on_local_disk_build_once",
              "tests/test_leases.py::test_of_many_claimants_of_an_expired_lease_one_takes_it_over")),
    Mutation("s3_create_unconditional", "raysd/leases.py",
             ', IfNoneMatch="*")', ")",
             ("tests/test_leases.py::test_two_claimants_on_s3_with_a_slow_upload_build_once",)),
    Mutation("s3_store_not_probed", "raysd/leases.py",
             "return s3 if _honours_if_none_match(s3, store.path(\"\")) else _refuse(store)", "return s3",
             ("tests/test_leases.py::test_an_s3_store_that_ignores_if_none_match_is_refused",)),
    Mutation("gcs_create_unconditional", "raysd/leases.py",
             "upload_from_string(data, if_generation_match=0)", "upload_from_string(data)",
             ("tests/test_leases.py::test_gcs_creates_with_a_generation_precondition",)),
    Mutation("lease_successor_ignored", "raysd/leases.py",
             "if self.store.exists(self._name(key, held.generation + 1)):\n            raise",
             "if False:\n            raise",
             ("tests/test_leases.py::test_a_builder_whose_lease_a_skewed_clock_took_over_finds_the_successor",)),
    Mutation("lease_never_runs_out", "raysd/leases.py",
             "if started > held.valid_until:", "if False:",
             ("tests/test_leases.py::test_renewals_that_keep_failing_end_in_lease_lost",)),
    Mutation("meta_published_over", "raysd/artifacts.py",
             "if not self.creator.create(self.store.path(key, META),",
             # a plain write, as before: publishes over whatever is there
             "if self.store.write_bytes(json.dumps(doc).encode(), key, META) or (lambda *_: False)(",
             ("tests/test_leases.py::test_a_published_artifact_is_never_published_over",)),
    Mutation("load_trusts_the_weights", "raysd/artifacts.py",
             "if state_hash(weights) != meta[\"weights_hash\"]:", "if False:",
             ("tests/test_leases.py::test_a_load_checks_the_weights_against_the_hash_in_meta",)),
    # --- chains (chain.py, recipe.py) ---
    # A chain's fine-tune seeded by the round it follows: its points no longer equal
    # independent runs of their T'.
    Mutation("chain_finetune_seeded_by_round", "raysd/recipe.py",
             "PointRun(seeded_for(cfg, stage), hooks, stage, 0, point=round_, **where)",
             "PointRun(seeded_for(cfg, stage), hooks, stage, round_, point=round_, **where)",
             ("tests/test_chain.py::test_a_chain_reports_every_point_bit_identical_to_an_independent_run",)),
    # The best point by the last one: a chain's Tune metric is its last T', not its best.
    Mutation("chain_best_is_last", "raysd/chain.py",
             "value > best if self.mode == \"max\" else value < best", "True",
             ("tests/test_chain.py::test_a_chain_reports_every_point_bit_identical_to_an_independent_run",)),
    # A chain run again (--resume, a restart) tells its points to Optuna a second time.
    Mutation("chain_point_told_twice", "raysd/resume.py",
             "if (raysd_id, t) in told or self.metric not in result:", "if self.metric not in result:",
             ("tests/test_resume.py::test_a_chains_points_are_optuna_trials_of_their_own_that_move_no_id_or_proposal",)),
    # A trial the killed driver left half drawn runs again without the params it lacked.
    Mutation("rerun_half_drawn", "raysd/resume.py", "                self._space(running)\n", "",
             ("tests/test_resume.py::test_a_trial_the_killed_driver_left_half_drawn_runs_again_with_every_param",)),
    # Sampler seeds by Optuna number: the points told between chains change later proposals.
    Mutation("chain_seed_counts_points", "raysd/resume.py",
             "number = drawn_number(study, trial.number)", "number = trial.number",
             ("tests/test_resume.py::test_a_chains_points_are_optuna_trials_of_their_own_that_move_no_id_or_proposal",)),
    # --- results and the comparison ---
    Mutation("z_interval", "raysd/compare.py",
             "stats.t.ppf(0.975, len(diff) - 1)", "stats.norm.ppf(0.975)",
             ("tests/test_compare.py::test_summary_table_means_stds_and_paired_interval",
              "tests/test_compare.py::test_paired_interval_is_scipys_paired_t_interval_over_the_seeds_both_ran")),
    Mutation("pairs_by_position", "raysd/compare.py",
             'b = done[done["variant"] == baseline].set_index(pair_on)[column]',
             'b = done[done["variant"] == baseline].reset_index(drop=True)[column]',
             ("tests/test_compare.py::test_paired_interval_is_scipys_paired_t_interval_over_the_seeds_both_ran",)),
    Mutation("contrast_against_finetune", "raysd/compare.py",
             'against[f"{test} - {pretrained}"] = (pretrained, contrasted)',
             'against[f"{test} - {pretrained}"] = (baseline, contrasted)',
             ("tests/test_compare.py::test_self_distill_is_also_paired_against_further_pretrain_by_fine_tuning_seed",)),
    # Under --protocol reference every trial of a variant has one seed; only finetune.seed varies.
    Mutation("reference_pairs_on_seed", "raysd/compare.py",
             'return "cfg.finetune.seed" if protocol == "reference" else "seed"', 'return "seed"',
             ("tests/test_compare.py::test_self_distill_is_also_paired_against_further_pretrain_by_fine_tuning_seed",)),
    Mutation("finetune_seed_ignored", "raysd/recipe.py",
             'if stage == "finetune" and cfg.finetune.seed is not None:', "if False:",
             ("tests/test_compare.py::test_a_fine_tuning_seed_repeats_fine_tuning_over_one_pre_training",)),
    Mutation("figure4_curve_per_round", "raysd/compare_plots.py",
             '"param.finetune.seed", "param.self_distill.rounds")', '"param.finetune.seed")',
             ("tests/test_compare.py::test_figure_4_plots_the_test_metric_against_the_rounds_that_varied",)),
    # Running trials' rows reach the history dataset only at Ctrl-C: a killed driver loses them.
    Mutation("history_parts_never_written", "raysd/writers.py",
             "        self.history.write_parts()\n        return True", "        return True",
             ("tests/test_writers.py::test_a_running_trials_rows_reach_its_history_parts_before_it_ends",)),
    # A stage's last row, reported again with the stage's summary, appended twice.
    Mutation("history_summary_row_twice", "raysd/history.py",
             "if pending and row_identity(pending[-1]) == identity:", "if False:",
             ("tests/test_writers.py::test_a_running_trials_rows_reach_its_history_parts_before_it_ends",)),
    # A trial run again from a checkpoint keeps the failed run's rows beside the new ones.
    Mutation("history_rerun_rows_twice", "raysd/history.py",
             "        if trial_id in self._reported:\n", "        if False:\n",
             ("tests/test_writers.py::test_a_failed_trial_run_again_by_resume_keeps_one_row_per_step",)),
    Mutation("trials_parquet_at_every_end", "raysd/writers.py",
             "if self._dirty and (force or time.time() - self._written_at >= self.history.part_seconds):",
             "if self._dirty:",
             ("tests/test_writers.py::test_trials_parquet_is_written_at_the_first_end_then_once_a_period_and_at_close",)),
    Mutation("trials_parquet_not_written_at_close", "raysd/writers.py",
             "        self.flush(force=True)\n", "        self.flush()\n",
             ("tests/test_writers.py::test_trials_parquet_is_written_at_the_first_end_then_once_a_period_and_at_close",)),
    # `ray up`'s default autoscaler (v2) taken for a fixed cluster: a study from zero workers refused.
    Mutation("autoscaler_v2_unrecognised", "raysd/cluster.py",
             "        return True if _autoscaler_v2_reported() else None\n", "        return None\n",
             ("tests/test_cluster.py::test_an_autoscaler_v1_or_v2_is_recognised_without_its_node_types",)),
    Mutation("plain_ray_start_taken_for_an_autoscaler", "raysd/cluster.py",
             '    return any(kind != f"node_{node}" for node, kind in (report.get("node_type_mapping") or {}).items())\n',
             "    return True\n",
             ("tests/test_cluster.py::test_an_autoscaler_v1_or_v2_is_recognised_without_its_node_types",
              "tests/test_cluster.py::test_a_local_ray_is_no_autoscaling_cluster")),
    Mutation("janitor_never_frees", "raysd/janitor.py",
             "                remove_placement_group(group)\n", "                pass\n",
             ("tests/test_janitor.py::test_the_janitor_frees_the_groups_of_controllers_that_died_with_their_owner",)),
    Mutation("trial_never_registers_its_group", "raysd/trial.py",
             "            ray.get(self._janitor.guard.remote(self._controller_id, me, group), timeout=60)\n",
             "            pass\n",
             ("tests/test_janitor.py::test_a_trials_group_is_freed_when_its_controller_is_killed_mid_study",)),
    # --- a trial's processes (trial.py, ddp.py) ---
    Mutation("controller_imports_torch", "raysd/ddp.py",
             "import ray\n", "import ray\nimport torch  # noqa: F401\n",
             ("tests/test_trial_process.py::test_the_trial_driver_and_its_backend_unpickle_without_torch",)),
    Mutation("config_check_imports_models", "raysd/config.py",
             '''    """The rules between settings, which no single field can state."""\n''',
             '''    """The rules between settings, which no single field can state."""\n    from raysd import models  # noqa: F401\n''',
             ("tests/test_trial_process.py::test_the_trial_driver_and_its_backend_unpickle_without_torch",)),
    Mutation("tensorboard_through_torch", "raysd/writers.py",
             "from tensorboard.summary.writer.record_writer import RecordWriter\n",
             "from tensorboard.summary.writer.record_writer import RecordWriter\n"
             "from torch.utils.tensorboard import SummaryWriter  # noqa: F401\n",
             ("tests/test_trial_process.py::test_the_study_driver_records_without_torch",)),
    Mutation("retried_driver_trains_a_failed_trial_again", "raysd/trial.py",
             'if failed and failed.partition("\\n")[0] == attempt:', "if False:",
             ("tests/test_trial_process.py::test_a_retried_driver_reraises_its_trials_failure_and_resume_runs_it_again",)),
    Mutation("trial_starts_a_dataset_manager", "raysd/trial.py",
             "    trainer = _Trainer(\n", "    trainer = DataParallelTrainer(\n",
             ("tests/test_trial_process.py::test_a_trials_train_run_starts_no_ray_data_manager_and_no_preemption_watcher",)),
    Mutation("trial_starts_a_preemption_watcher", "raysd/trial.py",
             '    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")\n', "",
             ("tests/test_trial_process.py::test_a_trials_train_run_starts_no_ray_data_manager_and_no_preemption_watcher",)),
    Mutation("resume_reraises_an_old_failure", "raysd/trial.py",
             'if failed and failed.partition("\\n")[0] == attempt:', "if failed:",
             ("tests/test_trial_process.py::test_a_retried_driver_reraises_its_trials_failure_and_resume_runs_it_again",)),
]


def copy_repository(dest: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)


def check_snippets(mutations: list[Mutation]) -> dict[str, str]:
    """name -> why, for each mutation whose original is missing or ambiguous in today's source."""
    problems = {}
    for m in mutations:
        count = (ROOT / m.file).read_text().count(m.original)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            problems[m.name] = f"original snippet {where} in {m.file}: {m.original!r}"
    return problems


def pytest_run(copy: Path, tests: tuple[str, ...], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """(pytest's exit code, its last lines), run in the copy on the copy's raysd."""
    # No bytecode: a mutation of the same length in the same second would load a stale .pyc.
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              *tests], cwd=copy, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode, " | ".join(lines[-3:])


def run_mutation(m: Mutation, copy: Path) -> tuple[str, str]:
    """(verdict, detail) of one mutation, applied to its own fresh copy of the repository."""
    if not m.tests:
        return "survived", "no fast test yet"
    copy_repository(copy)
    path = copy / m.file
    path.write_text(path.read_text().replace(m.original, m.replacement))
    started = time.perf_counter()
    code, tail = pytest_run(copy, m.tests)
    # 1: a test failed; 2: collection failed (the mutant does not import). Both catch it.
    verdict = {0: "survived", 1: "caught", 2: "caught"}.get(code, "error")
    detail = f"{time.perf_counter() - started:.0f} s"
    return verdict, detail if verdict == "caught" else f"{detail}, pytest exit {code}: {tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="a mutation's name (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at once (default 1)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.file:24s} {' '.join(m.tests) or '(no fast test)'}")
        return 0
    started = time.perf_counter()
    results = {name: ("error", why) for name, why in check_snippets(chosen).items()}
    for name, (_, why) in results.items():
        print(f"error     {name}: {why}", flush=True)
    with tempfile.TemporaryDirectory(prefix="raysd-mutations-") as tmp:
        base = Path(tmp) / "unmutated"
        copy_repository(base)
        found = subprocess.run([sys.executable, "-c", "import raysd; print(raysd.__file__)"], cwd=base,
                               env={**os.environ, "PYTHONPATH": str(base)}, capture_output=True, text=True)
        if not found.stdout.startswith(str(base)):
            print(f"error     the copy's raysd is not the one imported: {found.stdout}{found.stderr}")
            return 1
        # The selections must pass unmutated, or a red run says nothing about a mutation. It runs
        # beside the mutations; its verdict is awaited before theirs count.
        selection = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        with ThreadPoolExecutor(max(1, args.jobs) + 1) as pool:
            baseline = pool.submit(pytest_run, base, selection, 3 * TIMEOUT_S)
            runs = {pool.submit(run_mutation, m, Path(tmp) / m.name): m.name
                    for m in chosen if m.name not in results}
            for done in as_completed(runs):
                results[runs[done]] = done.result()
                verdict, detail = results[runs[done]]
                print(f"{verdict:9s} {runs[done]} ({detail})", flush=True)
            code, tail = baseline.result()
    print(f"{'baseline' if code == 0 else 'error':9s} unmutated selection ({len(selection)} tests): {tail}")
    counts = {v: [r[0] for r in results.values()].count(v) for v in ("caught", "survived", "error")}
    print(f"{counts['caught']} caught, {counts['survived']} survived, {counts['error']} errors "
          f"of {len(chosen)} mutations in {time.perf_counter() - started:.0f} s")
    return 0 if code == 0 and counts["caught"] == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
