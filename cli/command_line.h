// The `ringattn` command line: `ringattn <command> [flags]`, each command taking its own flags.
// The flags are absl flags (type, default, help text); a CommandLineSpec says which command
// takes which. ParseCommandLine reads argv itself, so that an unknown command or flag, a flag of
// another command, a bad value or a stray argument is a usage error (the caller exits 2) and
// help and version are asked for, not printed and exited. Then it fills the command's flags
// that its command line did not set from the environment, RINGATTN_<FLAG IN CAPITALS>, for the
// flags the command's spec names: command line, then environment, then default.
//
//   ringattn <command> [--flag=value | --flag value | --bool | --nobool]...
//   ringattn help [<command>]    ringattn [<command>] --help    ringattn --helpfull
//   ringattn --version
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ringattn {

struct CommandSpec {
  std::string name;
  std::string summary;             // one line, in the command list
  std::string description;         // the help's text before the flags: paragraphs, wrapped
  std::vector<std::string> flags;  // the absl flags it takes, in the help's order
  // Those of `flags` that an environment variable may set.
  std::vector<std::string> env_flags;
};

struct CommandLineSpec {
  std::string program = "ringattn";
  std::vector<CommandSpec> commands;
  std::string env_prefix = "RINGATTN_";
  std::string epilogue;  // paragraphs after the command list in the overview, wrapped

  const CommandSpec* Find(const std::string& command) const;
};

struct CommandLine {
  enum class Action {
    kRun,       // run `command`
    kHelp,      // print the overview (command null) or the command's help
    kHelpFull,  // print every flag
    kVersion,
  };
  Action action = Action::kRun;
  const CommandSpec* command = nullptr;
  std::vector<std::string> from_command_line;  // flags set by argv, in order
  std::vector<std::string> from_environment;   // flags set by their variables
};

// Reads `args` (args[0] is the program) against `spec` and sets the command's flags; `getenv`
// looks a variable up (nullptr: unset). InvalidArgument, with a message for the user, on any
// usage error; with no arguments at all, InvalidArgument whose message is the overview.
absl::StatusOr<CommandLine> ParseCommandLine(const CommandLineSpec& spec,
                                             const std::vector<std::string>& args,
                                             const std::function<const char*(const char*)>& getenv);

// "RINGATTN_LISTEN" for "listen".
std::string EnvironmentVariableOf(const CommandLineSpec& spec, const std::string& flag);

// The usage line and the command list, then the epilogue.
std::string Overview(const CommandLineSpec& spec);
// A command's usage, description and flags (help, default, variable), no other command's.
std::string CommandHelp(const CommandLineSpec& spec, const CommandSpec& command);
// Every flag, each with the commands that take it.
std::string AllFlagsHelp(const CommandLineSpec& spec);

}  // namespace ringattn
