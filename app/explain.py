"""What the app says about itself, in one place: a note per tab and per plot, a tooltip per control, the glossary.

Written for a student who knows what fine-tuning is but not diffusion LMs. A note answers three
questions: what am I looking at, how to read it, what to try next; the tabs only place it
(`accordion`), closed until clicked. A control's tooltip comes from `KNOBS` (`knob`), and the
glossary lists the same text. The method options are not described here: their help lives in
each method's config (`methods.base.option`), which the Train tab's controls and the glossary
both read. Nothing here quotes a measured number: those are in the results files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import gradio as gr

from lora_diffusion.methods import METHODS, describe, option_specs


@dataclass(frozen=True)
class Note:
    """One collapsible explanation: its title and its three answers (markdown)."""

    title: str
    what: str  # what am I looking at
    read: str  # how to read it
    next: str  # what to try next

    def markdown(self) -> str:
        return (f"**What am I looking at?** {self.what}\n\n**How to read it.** {self.read}\n\n"
                f"**What to try next.** {self.next}")


def accordion(note: Note) -> gr.Accordion:
    """The note where it is placed, closed: the page stays short until someone asks."""
    with gr.Accordion(note.title, open=False) as box:
        gr.Markdown(note.markdown())
    return box


INTRO = ("A **masked diffusion LM** writes an answer the way you fill in a cloze test: every answer position "
         "starts as `[MASK]`, and each denoising step predicts all masked positions and reveals those it is "
         "surest of, until none is left. *t* is the share still masked: 1 at the start, 0 at the end. "
         "Fine-tuning teaches it a task's answers; a PEFT method trains a small adapter instead of the whole "
         "model. Every tab and plot has a closed note (click it) on what it shows, how to read it and what to "
         "try next; the glossary at the bottom explains every knob. For a workshop, the **Lesson** tab walks "
         "through the other tabs in five steps: predict, run, reveal.")

# ---- Train -------------------------------------------------------------------------------

TRAIN_TAB = Note(
    "About this tab: Train",
    "Fine-tuning the base model on one task with one method. The method decides what is trained (some of the "
    "base's weights, or small modules added to it); everything else stays frozen. Training shows the model "
    "answers with a random share *t* of their tokens masked and teaches it to predict the masked ones.",
    "Pick a task and a method (only the chosen method's options are shown; the CSV upload only for "
    "'uploaded CSV'), press **Train** and watch the curve. The status line says whether your job is queued, "
    "running or evaluating. The table under it lists your adapters with their held-out score and the number "
    "of parameters they trained.",
    "Run the default, then the same run with method `lora` (weight LoRA), and compare the two rows of the table. "
    "Change one option at a time (the glossary says what each does). To see a trajectory in the Analyse tab, "
    "train on `suite_struct`: its answers are many tokens long, a sentiment answer is one word.")

LOSS_PLOT = Note(
    "How to read the loss curve and the score",
    "The training loss (left axis) and the held-out score (right axis, 0 to 1) of the job in the status line, "
    "against the optimiser step. When the job ends, the line beside the curve gives its score on the "
    "held-out split (the number of examples is on the line); a stopped job is not scored.",
    "The loss is the diffusion loss: the cross-entropy of the masked answer tokens, an upper bound on the "
    "answer's negative log-likelihood (nats per token). It jumps from step to step because every example is "
    "masked at its own random *t* (a nearly revealed answer is easy, an all-masked one hard): watch its trend. "
    "The score is measured on examples training never sees, on a fixed slice of them during the run. "
    "**Generative accuracy**: the sampler decodes the answer from all-`[MASK]`, and only an exact match of the "
    "answer tokens counts. **Verbalizer accuracy**: one model call on the all-masked answer (*t* = 1), and the "
    "label word it finds most likely is the prediction, so it is never an invalid word. Where they differ, "
    "the step-by-step decoding made the difference. A generation task reports ROUGE-L (the longest common "
    "word subsequence with the reference, as an F-measure) and token F1 (word overlap).",
    "A loss still falling at the last step: train more steps. A loss that falls while the score stays flat: "
    "try the method's default learning rate (0), or more examples to train on. **Stop** ends a running job at the "
    "next step; its adapter is kept but not scored.")

# ---- Generate ----------------------------------------------------------------------------

GENERATE_TAB = Note(
    "About this tab: Generate",
    "One prompt decoded step by step by the base model and by the adapter you pick (and, if you list "
    "LoRA-Diffusion adapters of several tasks, by a router that mixes them), side by side.",
    "Below: the decoding of each model, a line per step, and the size of the perturbation LoRA-Diffusion adds "
    "at each step. Each has its own note. The base has never seen your task: its answer shows what the "
    "adapter changed.",
    "Pick your adapter (the instruction, response length and steps follow it), then change the input: a "
    "negation or a 'but' clause in a review. Raise the temperature above 0 to sample, and change the seed.")

TRAJECTORY = Note(
    "How to read the decoding",
    "Each line is one denoising step of one model, the answer positions left to right. Grey: still `[MASK]`. "
    "Orange: revealed at this step. Green: revealed earlier; a revealed token never changes again.",
    "A step predicts every masked position at once and reveals those it is most confident of. `[SEP]` marks "
    "the end of the answer and fills the positions after it; positions predicted as `[SEP]` are revealed "
    "last. The answer in quotes is "
    "the text before the first `[SEP]`. *t* is the share of positions still masked when the step ran; ‖δ‖ is "
    "the perturbation's size where the model adds one (see the plot).",
    "Set more denoising steps than answer positions: nothing changes, since every step reveals at least one. "
    "Set fewer: several positions are revealed at once, each without seeing the others.")

PERTURBATION_NORM = Note(
    "How to read the perturbation norm",
    "For each model that adds a perturbation δ_t to the final hidden states after the last block "
    "(LoRA-Diffusion with `injection=final`, alone or router-composed): the mean length ‖δ_t‖ of that vector "
    "over the answer positions, at every step.",
    "Steps run from *t* = 1 (all masked) on the left. LoRA-Diffusion has separate modules for the early, "
    "middle and late phase of the trajectory (boundaries at *t* = 2/3 and 1/3), each scaled by its `scales` "
    "option, so a jump at a boundary is partly that scale. Methods that act inside the model (LoRA-Diffusion's "
    "default `blocks`, weight LoRA, adapters, ...) add no δ_t after it: the frame then says so.",
    "Train a LoRA-Diffusion adapter with `injection=final` and decode with it here. For the change any method "
    "makes, use Analyse → effective rank.")

# ---- Analyse -----------------------------------------------------------------------------

ANALYSE_TAB = Note(
    "About this tab: Analyse",
    "Looks inside trained adapters, on held-out examples of each adapter's own task: in how many directions "
    "it changes the model at each denoising step (effective rank), what those changes look like in 2-D "
    "(trajectory t-SNE), and how much ordinary text modelling it lost (forgetting, on generic text). Below "
    "them: a router's weights for an instruction.",
    "Pick adapters, then press a button: the plots show that analysis, with a one-line summary above them "
    "and a note below. The sampler takes at most one step per answer position, so an adapter whose answer "
    "is one word and an end marker (sentiment, topic) gives only 2 steps: too few to see a trajectory.",
    "Train an adapter on `suite_struct` (answers like `colour : red ; object : car ; place : station`) with "
    "LoRA-Diffusion and another with weight LoRA (`lora`), then compare how their effective rank changes from "
    "step to step.")

EFFECTIVE_RANK = Note(
    "Effective rank: what it is and how to read it",
    "For each adapter, the change it makes to the final hidden states at the answer positions, at every "
    "denoising step: LoRA-Diffusion with `injection=final` adds its own δ_t; for every other adapter it is "
    "the fine-tuned model's hidden states minus the base's, on the same partly revealed input. The changes "
    "of all examples and positions are stacked into one matrix per step. Its **effective rank** is "
    "exp(entropy of its normalised singular values) (Roy & Vetterli): 1 when a single direction carries the "
    "whole change, up to the matrix's smaller side when every direction carries an equal share.",
    "Steps run from *t* = 1 (all masked) on the left; the dotted lines at *t* = 2/3 and 1/3 are "
    "LoRA-Diffusion's phase boundaries (early, middle, late). Higher means the change is spread over more "
    "directions. A method's rank option bounds its own update (a weight update, a LoRA-Diffusion module), "
    "not the change it causes in the final states: a weight-LoRA update passes through the frozen layers "
    "after it, so its effective rank here can exceed *r*.",
    "Does the rank fall from early to late steps, as LoRA-Diffusion's `adaptive` schedule assumes? Train "
    "`schedule=inverted` or `uniform` on the same task and see whether the measured rank follows the option "
    "or the data.")

TSNE = Note(
    "Trajectory t-SNE and trustworthiness: how to read them",
    "Each point is one (adapter, held-out example, step): the example's change at that step (as for "
    "effective rank), averaged over its answer positions, placed in 2-D by t-SNE (or PCA). The first map "
    "colours the points by task, with the phase as the symbol; the second shows the base model's own hidden "
    "states on the same inputs, coloured by step.",
    "t-SNE keeps neighbours: points close on the map are close in the original space, but the distances "
    "between clusters and their sizes mean little. PCA, a linear projection onto the two directions of most "
    "variance, keeps the overall layout instead. **Trustworthiness** (scikit-learn, 5 neighbours) says how "
    "far to trust a map: 1 when every point's neighbours on the map are its neighbours in the original space "
    "too; lower when the map invents neighbourhoods. For LoRA-Diffusion, clusters by task and by phase come "
    "**by construction**: each task has its own adapter and each phase its own modules, so their outputs lie "
    "in different subspaces. That separation shows the method's structure, not something learned; the shape "
    "inside a cluster (steps advancing along a curve) says more.",
    "Pick LoRA-Diffusion adapters of two or more tasks, one with long answers (`suite_struct`), and look for "
    "the steps advancing along a curve. Then switch to PCA and compare the trustworthiness.")

FORGETTING = Note(
    "Forgetting and NELBO: how to read them",
    "Generic text the base was not trained on (the held-out part of WikiText-2 and TinyStories in the data "
    "folder), in rows of 128 tokens, scored under the base and under each adapter. The score is the "
    "**NELBO**: the diffusion loss, averaged over several masking rates *t*, in nats per token; it is an "
    "upper bound on the negative log-likelihood, and exp(NELBO) bounds the perplexity.",
    "Lower is better. A bar above the base's means the fine-tuned model predicts ordinary text worse: it has "
    "forgotten some language modelling. There is no prompt and no instruction here: every token is part of "
    "what the model denoises, so the adapter's change reaches every masked token.",
    "Compare a method that trains few parameters (`bitfit`, `prefix`) with one that trains many (`full`) "
    "after the same steps; train longer and see whether the bar rises.")

ROUTER = Note(
    "Router weights: what they mean",
    "LoRA-Diffusion adapters of different tasks composed into one model. A small router (a 2-layer MLP) reads "
    "the instruction, as the average of the base's word embeddings of its tokens, and gives each adapter a "
    "weight; at every denoising step the composed perturbation is the weighted sum of the adapters' "
    "perturbations. The router is trained once per set of adapters, on paraphrases of each task's "
    "instruction with the adapters frozen; after that it answers at once.",
    "The bars are the weights for the instruction you typed; they sum to 1. A bar near 1: that adapter acts "
    "almost alone. Even bars: a blend of them. The router sees only the instruction, never the input, and an "
    "average of word embeddings ignores word order.",
    "Type a new paraphrase of one task's instruction, then an instruction that fits no task, and see how sure "
    "the router is. Decode with the same adapters in the Generate tab ('also router-composed').")

# ---- Compare -----------------------------------------------------------------------------

COMPARE_TAB = Note(
    "About this tab: Compare",
    "Your runs side by side (every adapter you trained or imported, with its score and its loss curve); a list "
    "of sentences answered by several adapters at once; and results files written by the project's commands, "
    "from the checkout's `results/` and the workspace's `results/`: `lora-diffusion compare` trains every "
    "method on one task with the same budget and several seeds; `lora-diffusion analyze scaling` measures "
    "memory and speed against rank. Nothing is trained here.",
    "Your runs fill in by themselves (and with **Refresh runs**). For a results file, pick it and press its "
    "button. Each table and chart has a note below it. **Download figures** at the bottom gives every chart "
    "of the tab as a page that opens offline, for slides.",
    "Train the same task with two methods in the Train tab and compare their rows here; download a run "
    "(Train tab, Prepare download) and give the zip to a neighbour: their Import shows it with its score and "
    "curve. Run `lora-diffusion compare` on a task of your own, put its JSON file in the workspace's "
    "`results/`, and reload the page to find it in the list.")

COMPARE_RUNS = Note(
    "How to read your runs",
    "A row per adapter of your workspace (and the shared ones, if shown): its method and task, the optimiser "
    "steps it trained, the parameters it trained, its score on the held-out split with the metric's name, "
    "the training time and its status (done, stopped at step N, imported, shared). The first chart is the "
    "score per run, a colour per method; the second the training loss per run against the step.",
    "Scores are comparable only between runs of one task with one metric. A stopped run has no score: it was "
    "never evaluated. One run per setting is one seed: a gap of a point or two may be noise (the results "
    "files below report the spread over seeds). Imported runs show the score and curve their zip carried.",
    "Train a second seed of your best run and see how far its score moves; then compare methods by "
    "the score they reach for the parameters they train.")

SEVERAL_ADAPTERS = Note(
    "About: several adapters at once",
    "The same sentences answered by several models at once: the base and any of your adapters (and routers "
    "you composed in the Generate tab). A row per sentence, a column per model. LoRA-Diffusion and weight "
    "LoRA adapters share one batch (each row of it decoded with its own adapter, the base's rows with none); "
    "other methods and routers decode on their own. Every answer is what that model gives alone: greedy, one "
    "step per answer position.",
    "Each adapter reads its own task's instruction unless you type one; the base and a router read the first "
    "adapter's. The response length is the longest the adapters were trained with unless you set one. Where "
    "the columns disagree, the adapters learned different things; where the base agrees with an adapter, "
    "that sentence needed no fine-tuning.",
    "Add sentences that are hard for a bag of words: a negation ('not bad at all'), a contrast ('brilliant, "
    "but'), sarcasm. Compare an adapter trained for 50 steps with one trained for 500.")

FIGURES_BUTTON = "Download figures (HTML and PNG)"
FIGURES_BUTTON_HTML_ONLY = "Download figures (HTML; PNG needs the figures extra: pip install 'lora-diffusion[figures]')"

COMPARE_RESULTS = Note(
    "How to read the methods table and chart",
    "One row per method (or configuration), each trained for the same steps and batch size on the same data "
    "and scored on the same held-out examples; the line above the table gives the budget and the seeds. The "
    "chart is the headline score of each row.",
    "Scores are mean ± sample standard deviation over seeds (the chart's error bars): a difference smaller "
    "than the spread is not a difference. *gen. acc.* and *verbalizer acc.* are explained in the Train tab's "
    "loss-curve note; *% of full FT* is the score relative to full fine-tuning; *trainable params* and "
    "*adapter bytes* are what a method trains and saves. *s/step* depends on the machine and on what ran "
    "beside it.",
    "Find the cheapest method within one spread of the best. A high final train loss means the method did "
    "not fit the training data within this budget.")

SCALING = Note(
    "How to read the scaling plots",
    "For weight LoRA and LoRA-Diffusion at several ranks: trainable parameters, optimizer state, peak "
    "training memory and time per training step (dashed lines: methods without a rank, for reference). "
    "Then generation speed, in answer tokens per second, against batch size, per answer length L.",
    "The rank and batch-size axes are logarithmic, as are the parameter and memory axes, so a straight line "
    "there is a power law. The device the training was measured on is in the title: compare shapes across "
    "machines, not absolute numbers. A line marked `merged` folded the adapter into the base weights before "
    "generating.",
    "Find the rank at which memory or step time starts to grow, and set it against the scores in the "
    "methods table.")

# ---- Lesson ------------------------------------------------------------------------------

LESSON_TAB = Note(
    "About this tab: Lesson",
    "A guided path through the other tabs for a workshop of 60 to 90 minutes, in five numbered steps. Each "
    "step asks a question, runs what the other tabs run (the same training, decoding and analyses) and then "
    "reveals what was measured in your workspace, next to what you predicted.",
    "Work from the top. Pick your prediction before you press **Run**: Run locks it in, so changing it "
    "afterwards does not count. A training step shows its status and loss curve as the Train tab does, and "
    "the page stays usable while it runs. **Reveal** states the measured answer, computed from what the run "
    "just measured, and whether your prediction matched. The adapters trained here are listed in the Train "
    "tab too.",
    "Repeat a step in its own tab with one knob changed: another seed, `injection=final` for LoRA-Diffusion, "
    "or the task `suite_struct` for a longer trajectory. Instructors: the bottom of the tab has the reset for "
    "the next group; each step's **Export** saves its figures for slides.")

LESSON_INTRO = ("Five steps, each in three parts: **predict** (pick an answer), **run** (the button locks your answer "
                "in), **reveal** (the measured answer beside yours). Steps 1 and 2 train for a minute or two each "
                "on a laptop CPU; steps 3 to 5 use the two adapters they train.")

# The text above each step (placeholders: the Train tab's default run, and the number of reviews in step 3).
LESSON_STEPS = (
    "### Step 1 · Train LoRA-Diffusion: the Train tab's default run\n"
    "LoRA-Diffusion on `{task_name}` (is a short review positive or negative?): {steps} steps of {batch_size} "
    "examples, seed {seed}. The base stays frozen; the adapter adds a small learned change to the hidden states "
    "after every transformer block at every denoising step, with its own modules for the early, middle and late "
    "phase of the denoising. Its score is the held-out accuracy: reviews the run never saw, each answer decoded "
    "from all-`[MASK]`.",
    "### Step 2 · Train weight LoRA r=16 on the same task and budget\n"
    "The classic PEFT method: a rank-16 update B·A of the attention's weight matrices, the same at every "
    "denoising step. Everything else as in step 1: the task, {steps} steps of {batch_size} examples, the seed, "
    "each method's own default learning rate. The same budget means the same training examples seen, not the "
    "same number of parameters: the reveal shows both.",
    "### Step 3 · Tricky reviews through both adapters\n"
    "{n_reviews} reviews written for this lesson, none of them in the task's data, some built to trip a "
    "classifier: negations ('never good', 'not bad at all') and contrasts, where one clause praises and the "
    "other criticises ('but': the clause after it decides; 'although': the main clause decides). Tick the "
    "reviews you expect each adapter to answer right, then Run: both decode every review from all-`[MASK]`, "
    "step by step, as in the Generate tab.",
    "### Step 4 · When in the denoising does each adapter act?\n"
    "Effective rank per denoising step, as in the Analyse tab: at each step, over how many directions the "
    "adapter's change to the final hidden states spreads (1: a single direction carries it all). "
    "LoRA-Diffusion gives its early-phase modules the largest rank by default, after the paper's claim that "
    "the early, mostly masked steps need the most. The sampler takes at most one step per answer position, "
    "and a sentiment answer is a word and its end marker: the reveal says which phases had a step.",
    "### Step 5 · What did fine-tuning cost?\n"
    "Forgetting, as in the Analyse tab: ordinary English text (held-out WikiText-2 and TinyStories) scored "
    "under the base and under each adapter, as the NELBO in nats per token (lower is better). An adapter that "
    "scores it worse than the base has lost some of the base's language modelling. It needs the data folder "
    "the workbench was started with.",
)

# The prediction each step asks for (the label of its control; KNOBS["Lesson"] holds the tooltips).
LESSON_QUESTIONS = {
    1: "Step 1: how well will the default LoRA-Diffusion adapter answer held-out reviews?",
    2: "Step 2: how will LoRA-Diffusion's held-out accuracy compare with weight LoRA's?",
    3: "Step 3: which reviews will LoRA-Diffusion answer right?",
    "3b": "Step 3: which reviews will weight LoRA answer right?",
    4: "Step 4: in which phase will LoRA-Diffusion's change have the highest effective rank?",
    5: "Step 5: which adapter will score ordinary text worse than the base by more?",
}
LESSON_PLOTS = {1: "step 1: loss and held-out score", 2: "step 2: loss and held-out score",
                4: "step 4: effective rank per step", 5: "step 5: forgetting"}

LESSON_INSTRUCTOR = (
    "### For the instructor\n"
    "**Export** under each step saves that step's figures as pages that open offline (plotly's HTML), and as "
    "PNG images where kaleido is installed (the `figures` extra), for slides. Between groups, clear the "
    "workspace: it deletes every adapter and run of this browser's user, in every tab, and starts the lesson "
    "over.")

# ---- Tooltips: the app's own controls, per tab (label -> tooltip) -------------------------

KNOBS: dict[str, dict[str, str]] = {
    "Every tab": {
        "also show the shared adapters (read-only, from the workspace's shared/ folder)":
            "adapters the operator put in the workspace's shared/ folder: anyone may use them, nobody can "
            "change or delete them",
    },
    "Train": {
        "task": "what to fine-tune on: the suite_* tasks are built in and small (suite_struct has long answers); "
                "sst2, agnews and agnews_title need the data folder; 'uploaded CSV' trains on your file",
        "text column": "the column of your CSV holding the input text",
        "label column": "the column of your CSV holding each row's label: its values, lowercased, are the "
                        "answer words",
        "max train examples (0 = all)": "train on a seeded subset of this many examples; 0 uses the whole "
                                        "training split",
        "method": "the PEFT method: what each trains is in the glossary; its options appear below",
        "learning rate (0 = the method's default)": "the optimiser's step size; 0 takes the method's own "
                                                    "default (in the glossary)",
        "steps": "optimiser steps, each on one batch",
        "batch size": "examples per step",
        "seed": "fixes the subset, the batch order, the masking and the adapter's initial weights: the same "
                "seed repeats a run",
        "adapter": "one of your adapters, to download or delete",
        "yes, delete everything of mine": "a safety catch for the button beside it, which deletes all your "
                                          "adapters and runs",
    },
    "Generate": {
        "adapter": "the fine-tuned model decoded beside the base; picking one sets the instruction and response "
                   "length it was trained with, and the steps it was scored with",
        "instruction": "what the model is asked to do; an adapter was trained with its task's instruction",
        "input": "the text the instruction is about",
        "response length (tokens)": "answer positions to decode, all starting as [MASK]; positions past an "
                                    "adapter's trained length were never trained",
        "denoising steps": "model calls; each reveals at least one position, so more steps than positions "
                           "change nothing",
        "temperature": "0 takes the most likely token at each position; above 0 draws one, more randomly "
                       "the higher it is",
        "seed": "the random draws, when the temperature is above 0",
        "also router-composed from these LoRA-Diffusion adapters (one per task; the router trains once)":
            "two or more LoRA-Diffusion adapters (injection final or blocks) of different tasks, mixed by a "
            "router that reads the instruction",
    },
    "Analyse": {
        "adapters to analyse": "your adapters; each runs on held-out examples of its own task (an adapter of "
                               "an uploaded CSV only in Forgetting)",
        "held-out examples (rows of text for forgetting)": "prompts per task (rows of generic text for "
                                                           "Forgetting): more is slower and steadier",
        "denoising steps": "sampler steps, at most one per answer position: a one-word answer gives 2",
        "projection": "t-SNE keeps neighbourhoods (slower); PCA is a linear projection (fast)",
        "LoRA-Diffusion adapters": "two or more, one per task, with injection final or blocks",
        "instruction": "any instruction: the router weighs the adapters by it alone",
    },
    "Compare": {
        "adapters (and the base) to compare": "the columns of the table: the base, your adapters and the "
                                              "routers you composed; up to 16",
        "sentences, one per line": "the rows of the table, each an input to answer; up to 32 (an empty line is "
                                   "skipped)",
        "instruction (empty: each adapter its task's own)": "what every column is asked; empty: each adapter "
                                                            "reads the instruction it was trained with",
        "response length (0: the longest the adapters were trained with)": "answer positions every column "
                                                                           "decodes; past an adapter's trained "
                                                                           "length it was never trained",
        "results file of `lora-diffusion compare`": "a methods comparison from the checkout's results/ or the "
                                                    "workspace's results/",
        "results file of `lora-diffusion analyze scaling`": "memory and speed against rank, from the same "
                                                            "folders",
    },
    "Lesson": {
        LESSON_QUESTIONS[1]: "pick before you run: the reveal puts the measured held-out accuracy in one of these "
                             "bands (two balanced labels: guessing scores about half)",
        LESSON_QUESTIONS[2]: "pick before you run step 2: within 3 points counts as even; the reveal shows both "
                             "held-out scores, measured in your workspace",
        LESSON_QUESTIONS[3]: "tick the reviews you expect LoRA-Diffusion to answer right (none ticked: you expect "
                             "none right)",
        LESSON_QUESTIONS["3b"]: "tick the reviews you expect weight LoRA to answer right",
        LESSON_QUESTIONS[4]: "phases split the denoising by t, the share of the answer still masked: LoRA-Diffusion "
                             "has separate modules for each",
        LESSON_QUESTIONS[5]: "forgetting: the change in held-out NELBO of ordinary text against the base; the "
                             "reveal shows both",
        "yes, clear my workspace for the next group": "a safety catch for the button beside it, which deletes all "
                                                      "your adapters and runs and starts the lesson over",
    },
}


def knob(tab: str, label: str) -> dict:
    """label= and info= of one of the app's own controls: `gr.Number(200, **knob("Train", "steps"))`.

    A label missing from KNOBS is a KeyError when the page is built, so no control goes unexplained."""
    return {"label": label, "info": KNOBS[tab][label]}


# ---- The glossary ------------------------------------------------------------------------

def method_summary(name: str) -> str:
    """What a method is, in the first lines of its module's and its class's docstrings (the library's words)."""
    cls = METHODS[name]
    docs = [sys.modules[cls.__module__].__doc__, cls.__doc__]  # a class without a docstring has None
    return " ".join(doc.strip().splitlines()[0] for doc in docs if doc)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def glossary() -> str:
    """Every knob of the page: the app's controls (KNOBS), then every option of every method, from its config."""
    parts = []
    for tab, knobs in KNOBS.items():
        rows = "\n".join(f"| {_cell(label)} | {_cell(info)} |" for label, info in knobs.items())
        parts.append(f"### {tab}\n\n| control | what it does |\n|---|---|\n{rows}")
    parts.append("### Method options\n\nEach method's options with their help, what they accept and their "
                 "default, as its config declares them (the Train tab shows the chosen method's).")
    for name, cls in METHODS.items():
        specs = option_specs(name)
        rows = "\n".join(f"| `{s.name}` | {_cell(describe(s))} |" for s in specs)
        table = f"| option | what it does |\n|---|---|\n{rows}" if specs else "No options."
        parts.append(f"#### `{name}`\n\n{method_summary(name)} Default learning rate: "
                     f"{cls.Config().default_lr():g}.\n\n{table}")
    return "\n\n".join(parts)
