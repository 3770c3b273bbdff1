#include "cli/command_line.h"

#include <algorithm>
#include <optional>
#include <set>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace ringattn {
namespace {

constexpr size_t kWidth = 100;  // help lines wrap here
constexpr char kIndent[] = "      ";

absl::Status Usage(absl::string_view message) { return absl::InvalidArgumentError(message); }

bool Contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// The commands that take `flag`, in the spec's order.
std::vector<std::string> CommandsTaking(const CommandLineSpec& spec, const std::string& flag) {
  std::vector<std::string> out;
  for (const CommandSpec& c : spec.commands) {
    if (Contains(c.flags, flag)) out.push_back(c.name);
  }
  return out;
}

// The absl flag `name` when some command takes it (absl's own flags are nobody's).
absl::CommandLineFlag* FindFlag(const CommandLineSpec& spec, const std::string& name) {
  if (CommandsTaking(spec, name).empty()) return nullptr;
  return absl::FindCommandLineFlag(name);
}

// The words of `text` filled into lines of kWidth: the first starts with `first`, the others
// with `indent`.
std::string Wrap(const std::string& first, absl::string_view text,
                 absl::string_view indent = kIndent) {
  std::string out = first;
  size_t column = first.size();
  bool line_empty = first.empty();
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!line_empty && column + 1 + word.size() > kWidth) {
      absl::StrAppend(&out, "\n", indent);
      column = indent.size();
      line_empty = true;
    }
    if (!line_empty) {
      out.push_back(' ');
      ++column;
    }
    absl::StrAppend(&out, word);
    column += word.size();
    line_empty = false;
  }
  out.push_back('\n');
  return out;
}

std::string DefaultOf(const absl::CommandLineFlag& flag) {
  const std::string value = flag.DefaultValue();
  return flag.IsOfType<std::string>() ? absl::StrCat("\"", value, "\"") : value;
}

// "  --name (help); default: D;[ env: VAR;]" for `command`'s help, or with "commands: ...;" and
// the commands that read the variable when `command` is null (every flag).
std::string FlagEntry(const CommandLineSpec& spec, const std::string& name,
                      const CommandSpec* command) {
  const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  if (flag == nullptr) return absl::StrCat("  --", name, " (undefined)\n");
  std::string text = absl::StrCat("(", flag->Help(), "); default: ", DefaultOf(*flag), ";");
  if (command != nullptr) {
    if (Contains(command->env_flags, name)) {
      absl::StrAppend(&text, " env: ", EnvironmentVariableOf(spec, name), ";");
    }
    return Wrap(absl::StrCat("  --", name), text);
  }
  absl::StrAppend(&text, " commands: ", absl::StrJoin(CommandsTaking(spec, name), ", "), ";");
  std::vector<std::string> reading;
  for (const CommandSpec& c : spec.commands) {
    if (Contains(c.env_flags, name)) reading.push_back(c.name);
  }
  if (!reading.empty()) {
    absl::StrAppend(&text, " env: ", EnvironmentVariableOf(spec, name), " (",
                    absl::StrJoin(reading, ", "), ");");
  }
  return Wrap(absl::StrCat("  --", name), text);
}

// Whether `arg` asks for help (--help, -h, --helpfull) or the version.
bool IsHelp(const std::string& arg) { return arg == "--help" || arg == "-help" || arg == "-h"; }
bool IsHelpFull(const std::string& arg) { return arg == "--helpfull" || arg == "-helpfull"; }
bool IsVersion(const std::string& arg) { return arg == "--version" || arg == "-version"; }

// Help and version win over everything else on the line (before a "--").
std::optional<absl::StatusOr<CommandLine>> HelpOrVersion(const CommandLineSpec& spec,
                                                         const std::vector<std::string>& args) {
  bool help = false, full = false, version = false;
  std::vector<std::string> positional;
  for (size_t i = 1; i < args.size() && args[i] != "--"; ++i) {
    const std::string& a = args[i];
    help |= IsHelp(a);
    full |= IsHelpFull(a);
    version |= IsVersion(a);
    if (a.empty() || a[0] != '-') {
      positional.push_back(a);
    } else if (a.find('=') == std::string::npos) {
      // "--name value": the value is no command.
      const absl::CommandLineFlag* flag =
          FindFlag(spec, a.substr(a.size() > 1 && a[1] == '-' ? 2 : 1));
      if (flag != nullptr && !flag->IsOfType<bool>()) ++i;
    }
  }
  const bool help_command = !positional.empty() && positional[0] == "help";
  if (!help && !full && !version && !help_command) return std::nullopt;
  CommandLine line;
  if (version) {
    line.action = CommandLine::Action::kVersion;
    return line;
  }
  if (full) {
    line.action = CommandLine::Action::kHelpFull;
    return line;
  }
  line.action = CommandLine::Action::kHelp;
  const size_t at = help_command ? 1 : 0;
  if (positional.size() > at) {
    line.command = spec.Find(positional[at]);
    if (line.command == nullptr) {
      return Usage(absl::StrCat("unknown command '", positional[at], "' (`", spec.program,
                                " help` lists the commands)"));
    }
  }
  return line;
}

}  // namespace

const CommandSpec* CommandLineSpec::Find(const std::string& command) const {
  for (const CommandSpec& c : commands) {
    if (c.name == command) return &c;
  }
  return nullptr;
}

std::string EnvironmentVariableOf(const CommandLineSpec& spec, const std::string& flag) {
  return absl::StrCat(spec.env_prefix, absl::AsciiStrToUpper(flag));
}

absl::StatusOr<CommandLine> ParseCommandLine(
    const CommandLineSpec& spec, const std::vector<std::string>& args,
    const std::function<const char*(const char*)>& getenv) {
  if (args.size() < 2) return Usage(Overview(spec));
  if (auto asked = HelpOrVersion(spec, args); asked.has_value()) return *std::move(asked);

  struct Given {
    std::string name;
    std::string value;
  };
  std::vector<Given> given;
  const CommandSpec* command = nullptr;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--" && i + 1 == args.size()) break;
    if (a == "--" || a.size() < 2 || a[0] != '-') {
      if (command == nullptr && a != "--") {
        command = spec.Find(a);
        if (command == nullptr) {
          return Usage(absl::StrCat("unknown command '", a, "' (`", spec.program,
                                    " help` lists the commands)"));
        }
        continue;
      }
      return Usage(absl::StrCat("unexpected argument '", a == "--" ? args[i + 1] : a,
                                "': the commands take flags only (--name=value)"));
    }
    const std::string body = a.substr(a[1] == '-' ? 2 : 1);
    const size_t eq = body.find('=');
    std::string name = body.substr(0, eq);
    std::string value = eq == std::string::npos ? "" : body.substr(eq + 1);
    bool has_value = eq != std::string::npos;
    absl::CommandLineFlag* flag = FindFlag(spec, name);
    if (flag == nullptr && !has_value && absl::StartsWith(name, "no")) {
      absl::CommandLineFlag* negated = FindFlag(spec, name.substr(2));
      if (negated != nullptr && negated->IsOfType<bool>()) {
        flag = negated;
        name = name.substr(2);
        value = "false";
        has_value = true;
      }
    }
    if (flag == nullptr) {
      return Usage(absl::StrCat("unknown flag --", name, " (`", spec.program, " ",
                                command != nullptr ? command->name : "<command>",
                                " --help` lists its flags)"));
    }
    if (!has_value) {
      if (flag->IsOfType<bool>()) {
        value = "true";
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        return Usage(absl::StrCat("--", name, " needs a value (--", name, "=value)"));
      }
    }
    given.push_back({name, value});
  }
  if (command == nullptr) {
    return Usage(absl::StrCat("no command given (`", spec.program, " help` lists them)"));
  }

  CommandLine line;
  line.command = command;
  for (const Given& g : given) {
    if (!Contains(command->flags, g.name)) {
      return Usage(absl::StrCat("--", g.name, " is not a flag of `", spec.program, " ",
                                command->name, "`; it is one of ",
                                absl::StrJoin(CommandsTaking(spec, g.name), ", "), " (`",
                                spec.program, " ", command->name, " --help` lists its flags)"));
    }
  }
  for (const Given& g : given) {
    std::string error;
    if (!absl::FindCommandLineFlag(g.name)->ParseFrom(g.value, &error)) {
      return Usage(absl::StrCat("invalid value '", g.value, "' for --", g.name, ": ", error));
    }
    if (!Contains(line.from_command_line, g.name)) line.from_command_line.push_back(g.name);
  }
  for (const std::string& name : command->flags) {
    if (!Contains(command->env_flags, name) || Contains(line.from_command_line, name)) continue;
    const std::string variable = EnvironmentVariableOf(spec, name);
    const char* value = getenv(variable.c_str());
    if (value == nullptr) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string error;
    if (flag == nullptr || !flag->ParseFrom(value, &error)) {
      return Usage(
          absl::StrCat("invalid value '", value, "' in ", variable, " (--", name, "): ", error));
    }
    line.from_environment.push_back(name);
  }
  return line;
}

std::string Overview(const CommandLineSpec& spec) {
  std::string out = absl::StrCat("usage: ", spec.program, " <command> [flags]\n", "       ",
                                 spec.program, " help [<command>]    (or ", spec.program,
                                 " <command> --help): a command's flags\n", "       ", spec.program,
                                 " --version\n", "commands:\n");
  size_t width = 0;
  for (const CommandSpec& c : spec.commands) width = std::max(width, c.name.size());
  for (const CommandSpec& c : spec.commands) {
    absl::StrAppend(&out, "  ", c.name, std::string(width + 2 - c.name.size(), ' '), c.summary,
                    "\n");
  }
  for (absl::string_view paragraph : absl::StrSplit(spec.epilogue, '\n', absl::SkipEmpty())) {
    absl::StrAppend(&out, Wrap("", paragraph, ""));
  }
  return out;
}

std::string CommandHelp(const CommandLineSpec& spec, const CommandSpec& command) {
  std::string out = absl::StrCat("usage: ", spec.program, " ", command.name, " [flags]\n");
  for (absl::string_view paragraph : absl::StrSplit(command.description, '\n', absl::SkipEmpty())) {
    absl::StrAppend(&out, Wrap("", paragraph, ""));
  }
  bool any_env = false;
  absl::StrAppend(&out, "flags:\n");
  for (const std::string& name : command.flags) {
    absl::StrAppend(&out, FlagEntry(spec, name, &command));
    any_env |= Contains(command.env_flags, name);
  }
  if (any_env) {
    absl::StrAppend(&out, "A flag's variable (env:) sets it when the command line does not.\n");
  }
  return out;
}

std::string AllFlagsHelp(const CommandLineSpec& spec) {
  std::set<std::string> names;
  for (const CommandSpec& c : spec.commands) names.insert(c.flags.begin(), c.flags.end());
  std::string out =
      absl::StrCat("every flag of ", spec.program, ", with the commands that take it:\n");
  for (const std::string& name : names) {
    absl::StrAppend(&out, FlagEntry(spec, name, nullptr));
  }
  return out;
}

}  // namespace ringattn
