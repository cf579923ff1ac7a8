"""Classroom exercises: one source tree, a generated student version, and the
gradient checks as the autograder.

The solutions live in the normal code, marked with nbgrader's delimiters (comment
lines ``### BEGIN SOLUTION`` / ``### END SOLUTION``; tests that students must not
see sit between ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS``). The
markers are comments, so the source tree is the working, fully tested package.
``python -m minblip.exercises student OUTDIR`` writes the student version: every
solution region becomes ``# YOUR CODE HERE`` and a ``raise NotImplementedError``
naming the exercise and where it is explained, hidden tests are removed, and
everything else is copied unchanged (see :mod:`minblip.exercises.student`).

:data:`EXERCISES` is the registry: for each exercise the functions that hold its
solution regions, the notebook that explains it, its learning goal, the expected
time, the pytest node ids that check it and the package functions it
re-implements. Everything else reads it: ``check`` runs an exercise's checks and
says what is wrong (:mod:`~minblip.exercises.runner`), ``grade`` grades each
exercise of each submission on its own (:mod:`~minblip.exercises.answers`,
:mod:`~minblip.exercises.grading`), and the notebooks' first cell keeps Run All
going past unfinished exercises (:mod:`~minblip.exercises.notebook`).
docs/instructors.md is the guide.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    """One exercise.

    ``regions`` names the functions whose bodies hold the solution regions, as
    ``"path::Qualified.name"``; a path under ``notebooks/`` names the notebook
    (``.ipynb``; its paired ``.py`` is handled the same way). ``tests`` are
    pytest node ids: zero-argument test functions that fail until the exercise is
    solved; those inside hidden-test regions are absent from the student version.

    ``reimplements`` names, as dotted import paths (``"minblip.optim.AdamW.step"``),
    the package functions that compute what the exercise asks for and that the
    package keeps (it needs them before the student gets there): while the
    exercise is checked, a call to one of them from the student's code fails
    (minblip.exercises.answers.ban_shortcuts), and the student version clears any
    kept notebook output that prints their source.
    """

    id: str
    title: str
    notebook: str  # file stem under notebooks/, e.g. "01_backprop_and_gradcheck"
    regions: tuple[str, ...]
    goal: str
    minutes: int
    tests: tuple[str, ...]
    reimplements: tuple[str, ...] = ()

    @property
    def notebook_path(self) -> str:
        return f"notebooks/{self.notebook}.ipynb"

    @property
    def in_notebook(self) -> bool:
        """True when the student writes the code in the notebook, not in the package."""
        return all(r.startswith("notebooks/") for r in self.regions)

    @property
    def heading(self) -> str:
        """The notebook section that explains the exercise."""
        return f"Exercise {self.id}"

    def stub_message(self) -> str:
        where = (f"; the graded copy of this cell is the one in {self.notebook_path} (an edit "
                 f"to its jupytext twin {self.notebook_path[:-6]}.py counts once synced into "
                 f"it with jupytext --sync)" if self.in_notebook else "")
        return (f"Exercise {self.id} ({self.title}) is yours to write: see "
                f"{self.notebook_path}, section {self.heading}{where}")


CHECKS = "tests/test_exercise_checks.py"


def _tests(*names: str) -> tuple[str, ...]:
    return tuple(f"{CHECKS}::{n}" for n in names)


EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "1.1", "softmax cross-entropy backward", "01_backprop_and_gradcheck",
        ("minblip/softmax.py::CrossEntropyLoss.backward",),
        "Turn dL/dz = (p * sum_k t_k - t) / N into code that also covers label smoothing, "
        "soft targets and ignored positions.",
        20, _tests("test_ex_1_1_class_ids_smoothing_and_ignore", "test_ex_1_1_soft_targets",
                   "test_ex_1_1_upstream_gradient_and_all_ignored")),
    Exercise(
        "1.2", "LayerNorm backward", "01_backprop_and_gradcheck",
        ("minblip/layers.py::LayerNorm.backward",),
        "Back-propagate through a normalisation whose mean and variance depend on the whole "
        "row, and accumulate (+=) into gamma and beta.",
        30, _tests("test_ex_1_2_layernorm_gradcheck", "test_ex_1_2_layernorm_used_twice")),
    Exercise(
        "1.3", "softmax backward as a Jacobian-vector product", "01_backprop_and_gradcheck",
        ("minblip/softmax.py::Softmax.backward",),
        "Multiply by the transposed softmax Jacobian diag(p) - p p^T without building it, "
        "along the layer's axis.",
        15, _tests("test_ex_1_3_softmax_gradcheck", "test_ex_1_3_other_axis")),
    Exercise(
        "2.1", "scaled dot-product attention backward with a mask", "02_attention",
        ("minblip/attention.py::ScaledDotProductAttention.backward",),
        "Undo out = softmax(Q K^T / sqrt(d) + mask) V line by line, and see why a masked key "
        "needs no special case in the backward.",
        30, _tests("test_ex_2_1_masked_attention_gradcheck", "test_ex_2_1_attention_dropout")),
    Exercise(
        "2.2", "the backward of the attention scores", "02_attention",
        ("notebooks/02_attention.ipynb::scores_backward",),
        "Differentiate a batched matrix product S = Q K^T * c over (B, H, T, d) arrays, "
        "transposing only the last two axes.",
        10, _tests("test_ex_2_2_notebook"),
        reimplements=("minblip.attention.ScaledDotProductAttention.backward",)),
    Exercise(
        "2.3", "multi-head attention forward, from scratch", "02_attention",
        ("notebooks/02_attention.ipynb::mha_forward",),
        "Write self- and cross-attention with H heads in NumPy alone: projections, the head "
        "split, the scaled scores, a boolean mask (a fully masked row gives zeros), the "
        "softmax, the head merge and the output projection.",
        30, _tests("test_ex_2_3_notebook"),
        reimplements=("minblip.attention.MultiHeadAttention.forward",
                      "minblip.t5.T5Attention.forward")),
    Exercise(
        "3.1", "patch embedding as reshape plus matmul", "03_vit_patch_embedding",
        ("minblip/vit.py::patchify",),
        "Cut images into p x p patches with one reshape and one transpose, in the pixel "
        "order of a PyTorch conv weight, so a stride-p convolution becomes a matmul.",
        20, _tests("test_ex_3_1_patchify_matches_a_convolution", "test_ex_3_1_patch_order")),
    Exercise(
        "3.2", "the backward of patchify", "03_vit_patch_embedding",
        ("minblip/vit.py::unpatchify",),
        "See that the adjoint of a pure rearrangement of pixels is its inverse, and write it: "
        "unpatchify, which PatchEmbed's backward uses.",
        15, _tests("test_ex_3_2_unpatchify_entries", "test_ex_3_2_unpatchify_is_the_backward")),
    Exercise(
        "4.1", "text embeddings backward with repeated ids", "04_text_transformer",
        ("notebooks/04_text_transformer.ipynb::text_embeddings_backward",),
        "Scatter-add into the word table with np.add.at (ids repeat) and reduce the position "
        "table's gradient over the batch it was broadcast over.",
        15, _tests("test_ex_4_1_notebook"),
        reimplements=("minblip.layers.Embedding.backward", "minblip.text.TextEmbeddings.backward")),
    Exercise(
        "4.2", "capstone: the whole backward of a BERT layer with cross-attention",
        "04_text_transformer",
        ("notebooks/04_text_transformer.ipynb::postnorm_block_backward",),
        "Back-propagate through a post-norm block from its parts (three residual sub-blocks, "
        "dropout, cross-attention's two inputs), gradient-check it, and train a tiny "
        "image-grounded decoder whose layer is yours.",
        45, _tests("test_ex_4_2_notebook"),
        reimplements=("minblip.transformer.PostNormBlock.backward",)),
    Exercise(
        "5.1", "the ITC loss and its backward", "05_itc",
        ("minblip/objectives.py::itc_forward", "minblip/objectives.py::itc_backward"),
        "Write the symmetric InfoNCE loss over the batch's similarity matrix and its "
        "gradient for the features (used twice) and the learnable temperature.",
        40, _tests("test_ex_5_1_itc_gradcheck_in_batch", "test_ex_5_1_itc_with_banks",
                   "test_ex_5_1_itc_values")),
    Exercise(
        "5.2", "L2 normalisation backward", "05_itc",
        ("notebooks/05_itc.ipynb::l2_normalize_backward",),
        "Differentiate y = x / ||x||: the gradient is the upstream one with its component "
        "along y removed, divided by the norm.",
        15, _tests("test_ex_5_2_notebook"), reimplements=("minblip.softmax.L2Normalize.backward",)),
    Exercise(
        "6.1", "hard-negative mining and the np.add.at gather", "06_itm_hard_negatives",
        ("minblip/objectives.py::hard_negative_weights", "minblip/blip.py::pretrain_step"),
        "Build BLIP's sampling weights (softmax, + 1e-4, positive zeroed after the softmax) "
        "and scatter the negatives' image gradient back with np.add.at.",
        25, _tests("test_ex_6_1_hard_negative_weights", "test_ex_6_1_repeated_negative_gradient")),
    Exercise(
        "6.2", "the backward of a gather with repeated rows", "06_itm_hard_negatives",
        ("notebooks/06_itm_hard_negatives.ipynb::gather_rows_backward",),
        "Write the scatter-add that undoes x[index] when an index repeats.",
        10, _tests("test_ex_6_2_notebook"), reimplements=("minblip.layers.Embedding.backward",)),
    Exercise(
        "7.1", "nucleus (top-p) filtering", "07_lm_and_decoding",
        ("minblip/generation.py::top_p_filter",),
        "Keep the smallest set of most likely tokens whose probability reaches top_p, with "
        "sorting, a cumulative sum and a scatter back to vocabulary order.",
        20, _tests("test_ex_7_1_top_p_keeps_the_nucleus", "test_ex_7_1_top_p_rows_and_ties")),
    Exercise(
        "7.2", "the tied output layer's backward", "07_lm_and_decoding",
        ("notebooks/07_lm_and_decoding.ipynb::tied_output_backward",),
        "Back-propagate logits = t E^T + b into t, the shared embedding table E and b.",
        15, _tests("test_ex_7_2_notebook"),
        reimplements=("minblip.text.LMHead.backward", "minblip.lm.LanguageModel.backward",
                      "minblip.layers.Linear.backward")),
    Exercise(
        "8.1", "tying the MED encoder and decoder", "08_med_pretraining_step",
        ("minblip/text.py::build_med",),
        "Share every module except self-attention between the text encoder and decoder by "
        "handing over the same objects, so gradients add up in one Param.",
        20, _tests("test_ex_8_1_sharing_all_but_self_attention", "test_ex_8_1_shared_gradient")),
    Exercise(
        "8.2", "one weight, two models: the shared gradient", "08_med_pretraining_step",
        ("notebooks/08_med_pretraining_step.ipynb::shared_ffn_step",),
        "Run a module held by the encoder and the decoder twice and back-propagate both uses "
        "before anything is zeroed, so its Params get the sum.",
        15, _tests("test_ex_8_2_notebook")),
    Exercise(
        "9.1", "the Q-Former's three masks", "09_qformer_masks",
        ("minblip/qformer.py::qformer_mask",),
        "Build the uni-modal (ITC), bi-directional (ITM) and multimodal causal (ITG) "
        "self-attention masks over queries + text as boolean arrays, padding columns off.",
        25, _tests("test_ex_9_1_masks_block_by_block", "test_ex_9_1_modes_without_queries",
                   "test_ex_9_1_masks_entry_by_entry")),
    Exercise(
        "9.2", "the learned queries' gradient", "09_qformer_masks",
        ("notebooks/09_qformer_masks.ipynb::queries_and_text_backward",),
        "Undo x = cat(broadcast(Z), text): split the gradient and sum the query part over "
        "the batch the one (1, Q, D) Param was broadcast to.",
        10, _tests("test_ex_9_2_notebook"), reimplements=("minblip.qformer.QFormer.backward",)),
    Exercise(
        "10.1", "ITC with a maximum over the queries: the backward", "10_blip2_stage1",
        ("minblip/objectives.py::itc_max_backward",),
        "Route each pair's gradient through the max to its winning query only, scatter-add "
        "when one query wins several texts, and read the text-to-image loss transposed.",
        30, _tests("test_ex_10_1_itc_max_gradcheck", "test_ex_10_1_only_winners_get_gradient")),
    Exercise(
        "10.2", "ITG inputs and targets", "10_blip2_stage1",
        ("notebooks/10_blip2_stage1.ipynb::itg_inputs",),
        "Put [DEC] in place of [CLS] on a copy, and label each position with the next real "
        "token (-100 on padding and at the end), as stage 1's ITG loss reads them.",
        15, _tests("test_ex_10_2_notebook")),
    Exercise(
        "11.1", "masking the soft prompt out of the LM loss", "11_blip2_stage2",
        ("minblip/objectives.py::causal_lm_targets",),
        "Label the whole [soft prompt | text] sequence the way blip2_opt.py does: -100 on "
        "the prompt positions, the text prompt and padding, the text tokens elsewhere.",
        15, _tests("test_ex_11_1_targets", "test_ex_11_1_lm_loss_by_hand")),
    Exercise(
        "11.2", "the soft prompt's projection backward", "11_blip2_stage2",
        ("notebooks/11_blip2_stage2.ipynb::soft_prompt_backward",),
        "Back-propagate x = cat(q W + b, tokens) into the queries and the projection, "
        "keeping only the prompt positions' gradient and summing over batch and queries.",
        15, _tests("test_ex_11_2_notebook"),
        reimplements=("minblip.layers.Linear.backward", "minblip.lm.LanguageModel.backward")),
    Exercise(
        "12.1", "the fused qkv weight of a Hugging Face ViT", "12_fidelity",
        ("minblip/hf.py::fused_qkv_to_hf", "minblip/hf.py::fused_qkv_from_hf"),
        "Map one PyTorch nn.Linear (d_out, d_in) weight that fuses q, k and v to three "
        "minblip (d_in, d_out) weights and back: a split along the output rows and a transpose.",
        15, _tests("test_ex_12_1_fused_qkv_acts_like_nn_linear",
                   "test_ex_12_1_state_dict_round_trip")),
    Exercise(
        "13.1", "the CapFilt filter decision", "13_capfilt",
        ("minblip/capfilt.py::keep_mask", "minblip/capfilt.py::bootstrap_captions"),
        "Keep a text only when the ITM head says match (p > threshold), for web and "
        "synthetic texts alike, and assemble each web image's texts in the four settings "
        "of BLIP's Table 1.",
        15, _tests("test_ex_13_1_keep_mask", "test_ex_13_1_bootstrap_settings",
                   "test_ex_13_1_bootstrap_threshold_and_order")),
    Exercise(
        "13.2", "p(match) from the ITM logits, stably", "13_capfilt",
        ("notebooks/13_capfilt.ipynb::match_probability_from_logits",),
        "Turn two-way ITM logits into the match probability with a softmax over the right "
        "axis that cannot overflow.",
        10, _tests("test_ex_13_2_notebook"),
        reimplements=("minblip.softmax.softmax", "minblip.softmax.log_softmax",
                      "minblip.softmax.Softmax.forward")),
    Exercise(
        "14.1", "linear warmup, then cosine decay", "14_training",
        ("notebooks/14_training.ipynb::warmup_cosine_schedule",),
        "Write the learning-rate schedule: a linear warmup from warmup_start_lr, then half a "
        "cosine from base_lr down to min_lr over the steps that remain.",
        15, _tests("test_ex_14_1_notebook"), reimplements=("minblip.optim.warmup_cosine_lr",)),
    Exercise(
        "14.2", "AdamW's decoupled weight decay", "14_training",
        ("notebooks/14_training.ipynb::adamw_update",),
        "One AdamW step on one array: shrink the weight outside the Adam update, keep the "
        "moments, correct their bias; match minblip.optim.AdamW to 1e-12.",
        20, _tests("test_ex_14_2_notebook"), reimplements=("minblip.optim.AdamW.step",)),
)

# Files the student version leaves out: they test the generator or hold wrong answers.
INSTRUCTOR_ONLY = ("tests/test_exercises.py", "tests/exercise_wrong_answers.py")

BY_ID = {e.id: e for e in EXERCISES}


def by_region() -> dict[str, Exercise]:
    """``"path::Qualified.name"`` -> the exercise whose solution region it holds."""
    return {r: e for e in EXERCISES for r in e.regions}


def select(ids) -> tuple[Exercise, ...]:
    """The exercises with the given ids (all of them for None); unknown ids raise."""
    if ids is None:
        return EXERCISES
    ids = list(ids)
    unknown = [i for i in ids if i not in BY_ID]
    if unknown:
        raise ValueError(f"unknown exercise ids {unknown}; known: {sorted(BY_ID)}")
    return tuple(e for e in EXERCISES if e.id in ids)


__all__ = ["Exercise", "EXERCISES", "BY_ID", "INSTRUCTOR_ONLY", "by_region", "select"]
