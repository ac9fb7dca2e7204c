"""What a replica will really run: the config's render options made explicit for the checkpoint.

The manifest records these per row, so a row says how it was made even where the config said
nothing (a NABLA checkpoint, a MagCache calibration picked from the model name). Options that cannot
work with this checkpoint are refused here, before Ray starts.
"""

from __future__ import annotations

from dataclasses import replace

from kandinsky_batch.config.schema import ConfigError, ModelConfig
from pipelines import ModelSpec
from pipelines.caching import PUBLISHED, cache_args_problem, ratio_problem, ratios_for_model
from pipelines.kinds import BY_NAME
from pipelines.request import RenderOptions


def option_problems(kind: str, options: RenderOptions) -> list[str]:
    """Why options cannot apply to a model of this kind ("option=value: reason"), from the model layer's rules."""
    entry = BY_NAME[kind]
    if entry.upscales:  # its own rules say all (it takes none of the options below but sound)
        return entry.option_problems(options)
    found = [] if options.resolution_scale is None else [
        f"resolution_scale={options.resolution_scale}: only Kandinsky 6 SR upscales ({kind} does not)"]
    if not entry.sound and not options.sample_audio:
        found.append(f"sample_audio=False: only Kandinsky 6 renders sound ({kind} does not)")
    if not entry.expands_prompts and options.expand_prompts:
        found.append(f"expand_prompts=True: only Kandinsky 6 expands prompts ({kind} does not)")
    return found + entry.option_problems(options)


def effective_options(model: ModelConfig, spec: ModelSpec) -> tuple[RenderOptions, ModelSpec]:
    """The options every replica gets, and the model's limits under them (NABLA needs 128-px sizes)."""
    options = model.options().for_model(spec.attention_type)
    kind = options.attention_type or spec.attention_type
    if kind == "nabla" and options.attention_backend != "flex":
        raise ConfigError(f"model.attention_backend={options.attention_backend!r}: NABLA attention needs `flex`, "
                          "the backend that takes its block mask (leave it unset)")
    if options.nabla_args and kind != "nabla":
        raise ConfigError(f"model.nabla_args={dict(options.nabla_args)!r}: needs NABLA attention "
                          f"(model.attention_type: nabla); {spec.path} runs {kind} attention")
    if options.cache == "magcache":
        args = dict(options.cache_args)
        if "mag_ratios" not in args:
            name = ratios_for_model(spec.path)
            if name is None:
                raise ConfigError(f"model.cache_args.mag_ratios=None: MagCache needs ratios calibrated for the "
                                  f"checkpoint and none are published for {spec.path}; name one of "
                                  f"{', '.join(PUBLISHED)} or give a list (calibrate with diffusers' "
                                  "MagCacheConfig(calibrate=True))")
            options = replace(options, cache_args=tuple(sorted({**args, "mag_ratios": name}.items())))
        elif problem := ratio_problem(args["mag_ratios"]):
            raise ConfigError(f"model.cache_args.mag_ratios={args['mag_ratios']!r}: {problem}")
    if options.cache and (problem := cache_args_problem(options.cache, dict(options.cache_args))):
        key, why = problem
        value = dict(options.cache_args).get(key) if key else dict(options.cache_args)
        raise ConfigError(f"model.cache_args{'.' + key if key else ''}={value!r}: {why}")
    for problem in option_problems(spec.kind, options):
        raise ConfigError(f"model.{problem} ({spec.path})")
    return options, spec.with_attention(kind)
