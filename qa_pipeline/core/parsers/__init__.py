"""Text parsers: each turns one document format into blocks (paragraphs, code, tables) under heading paths.

blocks: what they produce; markdown, rst, text: one format each; html: HTML to Markdown, without a site's menus.
"""
