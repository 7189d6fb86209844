"""Build a language-model provider from its configuration (used by node workers, and by the
Mother Core when it runs an aggregator model)."""

from __future__ import annotations

from xpando.providers.base import Provider, ProviderConfig

# A sensible model per provider when a node does not name one (override with --model).
DEFAULT_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-3-5-haiku-latest",
    "gemini": "gemini-2.5-flash",
}
# Where each provider's key is read from (besides XPANDO_NODE_API_KEY), for error messages.
KEY_VARIABLES = {
    "openai": "OPENAI_API_KEY (or XPANDO_OPENAI_API_KEY)",
    "anthropic": "ANTHROPIC_API_KEY (or XPANDO_ANTHROPIC_API_KEY)",
    "gemini": "GEMINI_API_KEY or GOOGLE_API_KEY (or XPANDO_GEMINI_API_KEY)",
}
MODEL_PROVIDERS = ("openai", "openai-compatible", "anthropic", "gemini")


class ProviderConfigError(ValueError):
    """The configuration cannot make a working provider (shown to the operator as is)."""


def make_provider(config: ProviderConfig) -> Provider:
    """A provider for ``config``; raises :class:`ProviderConfigError` naming what is missing."""
    if config.provider not in MODEL_PROVIDERS:
        raise ProviderConfigError(
            f"unknown provider {config.provider!r}; expected one of "
            f"{', '.join(('offline', *MODEL_PROVIDERS))}"
        )
    if config.provider == "openai-compatible" and not config.base_url:
        raise ProviderConfigError(
            "provider 'openai-compatible' needs a base URL (--base-url or XPANDO_NODE_BASE_URL), "
            "e.g. http://127.0.0.1:11434/v1 for Ollama"
        )
    if config.provider in KEY_VARIABLES and (
        config.api_key is None or not config.api_key.get_secret_value().strip()
    ):
        raise ProviderConfigError(
            f"provider {config.provider!r} needs an API key: set "
            f"{KEY_VARIABLES[config.provider]} or XPANDO_NODE_API_KEY"
        )
    if config.timeout_s <= 0 or config.connect_timeout_s <= 0:
        raise ProviderConfigError("provider timeouts must be > 0 seconds")
    if config.max_output_tokens < 1:
        raise ProviderConfigError("max output tokens must be >= 1")
    if config.pricing.input_per_mtok < 0 or config.pricing.output_per_mtok < 0:
        raise ProviderConfigError("prices must be >= 0 USD per 1M tokens")
    if config.provider in ("openai", "openai-compatible"):
        from xpando.providers.openai_chat import OpenAIChatProvider

        return OpenAIChatProvider(config)
    if config.provider == "anthropic":
        from xpando.providers.anthropic_messages import AnthropicMessagesProvider

        return AnthropicMessagesProvider(config)
    from xpando.providers.gemini import GeminiProvider

    return GeminiProvider(config)
