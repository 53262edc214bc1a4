// `chunkd completion bash`: a bash completion script made from the help table (help.ts), so that every command
// and option the CLI takes completes, and a new command completes with no change here. What completes:
// - command words ("vol" → volume, "volume c" → create);
// - a command's options (--size, --json, --api ...);
// - an option's value: the choices its help names (--tls off|on|require), directories for DIR, files for PATH and
//   FILE, nothing to guess otherwise;
// - volume names where a command takes NAME, VOL or VOL@SNAP first, asked of the node (`chunkd volume list`, with
//   the --api the line gives, quietly: no node, no names).
import { commands, type CommandSpec } from './help.ts';

const table: Readonly<Record<string, CommandSpec>> = commands;

/** A bash word list, quoted for a double-quoted string (the table's words are plain). */
function words(list: Iterable<string>): string {
  return [...list].join(' ');
}

/** How an option's value completes in bash: choices, directories, files, or nothing. */
function valueCompletion(value: string): string {
  if (/^[a-z0-9]+(\|[a-z0-9]+)+$/.test(value)) return `COMPREPLY=($(compgen -W "${value.replaceAll('|', ' ')}" -- "$cur"))`;
  if (value === 'DIR') return 'COMPREPLY=($(compgen -d -- "$cur"))';
  if (/^(PATH|FILE)\b/.test(value)) return 'COMPREPLY=($(compgen -f -- "$cur"))';
  return 'COMPREPLY=()';
}

export function bashCompletion(): string {
  const keys = Object.keys(table);
  const top = new Set(keys.map((key) => key.split(' ')[0]!));
  const groups = new Map<string, string[]>();
  for (const key of keys) {
    const [group, verb] = key.split(' ');
    if (verb !== undefined) groups.set(group!, [...(groups.get(group!) ?? []), verb]);
  }
  const optionCases = keys.map((key) => `    "${key}") opts="${words(Object.keys(table[key]!.options).map((name) => `--${name}`))} --help" ;;`);
  const valueCases = new Map<string, string>();
  for (const key of keys) {
    for (const [name, option] of Object.entries(table[key]!.options)) {
      if (option.type !== 'string') continue;
      valueCases.set(`${key}:--${name}`, `    "${key}:--${name}") ${valueCompletion(option.value ?? '')}; return ;;`);
    }
  }
  // The commands whose first argument is a volume (their usage starts NAME, VOL or VOL@SNAP after the words).
  const takesVolume = keys.filter((key) => table[key]!.usage.some((usage) => new RegExp(`^${key} (NAME|VOL)\\b`).test(usage)) && key !== 'volume create');
  return `# bash completion for chunkd (made by \`chunkd completion bash\` from its help table).
# Use: source <(chunkd completion bash), or save it as /etc/bash_completion.d/chunkd.
_chunkd() {
  local cur=\${COMP_WORDS[COMP_CWORD]} prev=\${COMP_WORDS[COMP_CWORD-1]}
  local key="" group="" api=() i word
  for ((i = 1; i < COMP_CWORD; i++)); do
    [[ \${COMP_WORDS[i]} == --api ]] && api=(--api "\${COMP_WORDS[i+1]}")
  done
  for ((i = 1; i < COMP_CWORD; i++)); do
    word=\${COMP_WORDS[i]}
    [[ $word == -* ]] && break
    case "$group" in
      "") case " ${words(groups.keys())} " in *" $word "*) group=$word ;; *) key=$word; break ;; esac ;;
      *) key="$group $word"; break ;;
    esac
  done
  if [[ -z $key ]]; then
    case "$group" in
${[...groups].map(([group, verbs]) => `      ${group}) COMPREPLY=($(compgen -W "${words(verbs)}" -- "$cur")); return ;;`).join('\n')}
      *) COMPREPLY=($(compgen -W "${words(top)}" -- "$cur")); return ;;
    esac
  fi
  if [[ $prev == --* ]]; then
    case "$key:$prev" in
${[...valueCases.values()].join('\n')}
    esac
  fi
  if [[ $cur == -* ]]; then
    local opts=""
    case "$key" in
${optionCases.join('\n')}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    return
  fi
  case "$key" in
    ${takesVolume.map((key) => `"${key}"`).join('|') || '"-"'})
      local n=$(( $(tr -cd ' ' <<<"$key" | wc -c) + 2 ))
      if (( COMP_CWORD == n )); then
        COMPREPLY=($(compgen -W "$(chunkd volume list "\${api[@]}" 2>/dev/null | cut -f1)" -- "$cur"))
      fi ;;
  esac
}
complete -F _chunkd chunkd
`;
}
