"""MassGen's tool result types (`massgen.tool`), as its custom tool files import them."""

from massgen.tool._result import AudioContent, ContentBlock, ExecutionResult, ImageContent, TextContent

__all__ = ["AudioContent", "ContentBlock", "ExecutionResult", "ImageContent", "TextContent"]
