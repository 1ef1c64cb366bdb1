# Paper 000 Table 1 as a make grid: concepts × poisons × defences → cloak poison → (mask) → cloak train-ti →
# cloak generate → cloak score → cloak score --table → cloak report. Included by examples/toy/Makefile (toy world,
# CPU) and examples/sd15-table1/Makefile (SD 1.5, GPU), which set the variables below. Every cell is its own target, so
# `make -j N` runs N cells at once; every command skips finished work on a rerun (cloak resumes by itself).
#
# Layout under $(WORK):
#   poisoned/<poison>/<concept>/       protected images (poison "none" uses $(DATA)/<concept> itself)
#   masks/<poison>/<concept>/          concept masks (LM defences)
#   ti/<poison>/<defence>/<concept>/   learned_embeds.safetensors
#   gen/<poison>/<defence>/<concept>/  generated images
#   scores/<poison>__<defence>.json    per-cell scores; $(TABLE).md/.csv/.png is the table
#   report/index.html                  the grid as one offline HTML page (cloak report)

CLOAK ?= cloak
WORK ?= work
TABLE ?= $(WORK)/table1
CONCEPTS ?= $(notdir $(patsubst %/,%,$(wildcard $(DATA)/*/)))
POISONS ?= none adm+ sds+ ea mist
DEFENCES ?= nominal jpeg t600 lm jpeg+t600 jpeg+lm szt
COMMON ?= --model $(MODEL) --device $(DEVICE) --seed $(SEED)
SEED ?= 0
DATA_DEP ?=  # a target that creates $(DATA) (the toy world writes its concepts)

# defences that need concept masks (loss mask)
MASKED_DEFENCES := lm jpeg+lm szt

.PHONY: all table report poisons clean-grid
# (the including Makefile may define a rule first, e.g. the toy world's $(DATA_DEP): `make` alone still means all)
.DEFAULT_GOAL := all
all: table report

# $(call poisoned,P,C): folder of concept C's images under poison P
poisoned = $(if $(filter none,$(1)),$(DATA)/$(2),$(WORK)/poisoned/$(1)/$(2))

define POISON_RULE
$(WORK)/poisoned/$(1)/$(2)/cloak.json: | $(DATA_DEP)
	$(CLOAK) poison $(DATA)/$(2) -o $(WORK)/poisoned/$(1)/$(2) -a $(1) --eps $(EPS) --steps $(POISON_STEPS) $(POISON_ARGS) $(COMMON)
endef

define MASK_RULE
$(WORK)/masks/$(1)/$(2)/.done: $(if $(filter none,$(1)),,$(WORK)/poisoned/$(1)/$(2)/cloak.json) | $(DATA_DEP)
	$(call make_masks,$(call poisoned,$(1),$(2)),$(WORK)/masks/$(1)/$(2))
	@mkdir -p $(WORK)/masks/$(1)/$(2) && touch $$@
endef

define CELL_RULE
$(WORK)/ti/$(1)/$(3)/$(2)/learned_embeds.safetensors: $(if $(filter none,$(1)),,$(WORK)/poisoned/$(1)/$(2)/cloak.json) $(if $(filter $(3),$(MASKED_DEFENCES)),$(WORK)/masks/$(1)/$(2)/.done) | $(DATA_DEP)
	$(CLOAK) train-ti $(call poisoned,$(1),$(2)) -o $(WORK)/ti/$(1)/$(3)/$(2) --preset $(3) $(if $(filter $(3),$(MASKED_DEFENCES)),--masks $(WORK)/masks/$(1)/$(2)) --token '$(TOKEN)' --init-token $(INIT_TOKEN) --steps $(TI_STEPS) --lr $(TI_LR) $(TI_ARGS) $(COMMON)

$(WORK)/gen/$(1)/$(3)/$(2)/cloak.json: $(WORK)/ti/$(1)/$(3)/$(2)/learned_embeds.safetensors
	$(CLOAK) generate -o $(WORK)/gen/$(1)/$(3)/$(2) --embedding $$< -p $(PROMPTS) -n $(PER_PROMPT) --steps $(GEN_STEPS) --guidance $(GUIDANCE) $(GEN_ARGS) $(COMMON)
endef

define SCORE_RULE
$(WORK)/scores/$(1)__$(2).json: $(foreach c,$(CONCEPTS),$(WORK)/gen/$(1)/$(2)/$(c)/cloak.json)
	@mkdir -p $(WORK)/scores
	$(CLOAK) score $(foreach c,$(CONCEPTS),$(WORK)/gen/$(1)/$(2)/$(c)) -r --ref $(DATA) --metrics $(METRICS) --label poison=$(1) --label defense=$(2) -o $$@ $(SCORE_ARGS)
endef

$(foreach p,$(filter-out none,$(POISONS)),$(foreach c,$(CONCEPTS),$(eval $(call POISON_RULE,$(p),$(c)))))
$(foreach p,$(POISONS),$(foreach c,$(CONCEPTS),$(eval $(call MASK_RULE,$(p),$(c)))))
$(foreach p,$(POISONS),$(foreach d,$(DEFENCES),$(foreach c,$(CONCEPTS),$(eval $(call CELL_RULE,$(p),$(c),$(d))))))
$(foreach p,$(POISONS),$(foreach d,$(DEFENCES),$(eval $(call SCORE_RULE,$(p),$(d)))))

SCORES := $(foreach p,$(POISONS),$(foreach d,$(DEFENCES),$(WORK)/scores/$(p)__$(d).json))

poisons: $(foreach p,$(filter-out none,$(POISONS)),$(foreach c,$(CONCEPTS),$(WORK)/poisoned/$(p)/$(c)/cloak.json))

table: $(SCORES)
	$(CLOAK) score --table $(SCORES) --rows poison --cols defense --metric $(TABLE_METRIC) --average-row "Psn Avg" --average-exclude none -o $(TABLE)

report: $(SCORES)
	$(CLOAK) report $(SCORES) -o $(WORK)/report --rows poison --cols defense --metric $(TABLE_METRIC) --average-row "Psn Avg" --average-exclude none

clean-grid:
	rm -rf $(WORK)
