"""`preftune completion bash|zsh`: a shell completion script generated from the parser itself
(the COMMANDS table: verbs, sub-verbs, each one's flags) and from config.py's dataclasses (the
`section.key=` overrides a verb reads), so it cannot drift from the CLI.

Written here rather than with shtab or argcomplete: neither is a dependency, argcomplete runs
Python (and so this package's imports) on every Tab press, and neither knows our `section.key=value`
positional overrides, which are most of what there is to complete. The script is one table, a
shell `case` read by a few lines of bash or zsh: verbs and sub-verbs, a verb's flags after `-`,
its settings as `section.key=` (no space after), and file names after `=` and for verbs that
take files.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import Config
from . import COMMANDS, _parser

__all__ = ["completion_table", "completion_script", "SHELLS"]


def _walk(parser: argparse.ArgumentParser, path: tuple = ()):
    """(command path, its parser) for the root and every verb and sub-verb."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _keys(sections: tuple[str, ...] | None) -> list[str]:
    return [f"{s.name}.{f.name}=" for s in dataclasses.fields(Config) if sections is None or s.name in sections
            for f in dataclasses.fields(s.default_factory())]


def completion_table() -> dict[str, dict[str, list[str]]]:
    """{"verb sub": {"sub": [...], "flags": [...], "choices": [...], "keys": [...], "files": ["1"] or []}}
    for every command path ("" is `preftune` itself): sub-verbs, flags, the choices of positional
    arguments, `section.key=` settings, and whether file names are arguments."""
    sections = {c.name: c.sections for c in COMMANDS} | {f"{c.name} {s.name}": s.sections for c in COMMANDS
                                                          for s in c.sub}
    table = {}
    for path, parser in _walk(_parser()):
        name = " ".join(path)
        subs = [n for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices]
        flags = [s for a in parser._actions for s in a.option_strings]
        overrides = any(a.dest == "overrides" for a in parser._actions)
        positionals = [a for a in parser._actions if not a.option_strings and a.dest != "overrides"
                       and not isinstance(a, argparse._SubParsersAction)]
        choices = [str(c) for a in positionals for c in a.choices or ()]
        table[name] = {"sub": subs, "flags": flags, "choices": choices,
                       "keys": _keys(sections.get(name) or None) if overrides else [],
                       "files": ["1"] if overrides or any(not a.choices for a in positionals) else []}
    return table


def _case(table: dict) -> str:
    """The table as a shell function both bash and zsh read: `_preftune_table PATH PART`."""
    arms = [f'        "{path}/{part}") echo "{" ".join(words)}";;'
            for path, parts in table.items() for part, words in parts.items() if words]
    return "_preftune_table() {\n    case \"$1/$2\" in\n" + "\n".join(arms) + "\n    esac\n}\n"


_BASH = r'''
_preftune() {
    local line="${COMP_LINE:0:COMP_POINT}" cmd="" cur w i
    local -a words
    read -ra words <<< "$line"
    [[ $line == *[[:space:]] || ${#words[@]} -eq 0 ]] && words+=("")
    cur="${words[${#words[@]}-1]}"
    for ((i = 1; i < ${#words[@]} - 1; i++)); do  # the verb (and sub-verb) typed so far
        w="${words[i]}"
        [[ $w == -* || $w == *=* ]] && continue
        if [[ " $(_preftune_table "$cmd" sub) " == *" $w "* ]]; then cmd="${cmd:+$cmd }$w"; else break; fi
    done
    COMPREPLY=()
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$(_preftune_table "$cmd" flags)" -- "$cur"))
    elif [[ $cur == *=* ]]; then  # a value: bash completes the part after "=" (it breaks words there)
        COMPREPLY=($(compgen -f -- "${cur#*=}"))
    else
        COMPREPLY=($(compgen -W "$(_preftune_table "$cmd" sub) $(_preftune_table "$cmd" choices) $(_preftune_table \
            "$cmd" keys)" -- "$cur"))
        [[ ${COMPREPLY[*]} == *= ]] && compopt -o nospace 2>/dev/null  # after a key: its value, no space
        [[ -n $(_preftune_table "$cmd" files) ]] && COMPREPLY+=($(compgen -f -- "$cur"))
    fi
}
complete -o default -F _preftune preftune
'''

_ZSH = r'''
_preftune() {
    local cmd="" cur="${words[CURRENT]}" w
    for w in "${(@)words[2,CURRENT-1]}"; do  # the verb (and sub-verb) typed so far
        [[ $w == -* || $w == *=* ]] && continue
        if (( ${${(z)$(_preftune_table "$cmd" sub)}[(Ie)$w]} )); then cmd="${cmd:+$cmd }$w"; else break; fi
    done
    if [[ $cur == -* ]]; then
        compadd -- ${(z)$(_preftune_table "$cmd" flags)}
    elif [[ $cur == *=* ]]; then
        compset -P '*='
        _files
    else
        compadd -- ${(z)$(_preftune_table "$cmd" sub)} ${(z)$(_preftune_table "$cmd" choices)}
        compadd -S '' -- ${(z)$(_preftune_table "$cmd" keys)}
        [[ -n $(_preftune_table "$cmd" files) ]] && _files
    fi
}
if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then  # autoloaded from $fpath: this is the first Tab
    _preftune "$@"
else  # sourced
    compdef _preftune preftune
fi
'''

SHELLS = {"bash": _BASH, "zsh": _ZSH}


def completion_script(shell: str) -> str:
    header = (f"# preftune completion for {shell}, generated by `preftune completion {shell}` from the CLI's own "
              "tables.\n# Install: preftune completion bash > ~/.local/share/bash-completion/completions/preftune\n"
              "#     or: preftune completion zsh > \"${fpath[1]}/_preftune\"  (then restart the shell)\n")
    if shell == "zsh":
        header = "#compdef preftune\n" + header
    return header + _case(completion_table()) + SHELLS[shell]


def _completion(args) -> int:
    print(completion_script(args.shell), end="")
    return 0
